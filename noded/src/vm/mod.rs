//! VM engine: QEMU command builder, QMP client, templates, clones and the pre-forked pool.

pub mod cli;
