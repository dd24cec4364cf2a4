//! TODO(skeleton): k8s
