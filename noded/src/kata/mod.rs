//! TODO(skeleton): kata
