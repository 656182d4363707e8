"""First-party modalities (image today; video and 3D plug in the same way)."""
