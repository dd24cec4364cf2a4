//! TODO(skeleton): observe
