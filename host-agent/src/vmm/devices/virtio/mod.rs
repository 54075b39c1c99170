//! Virtio devices over the virtio-mmio transport.
