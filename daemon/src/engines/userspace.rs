//! The userspace engine: AES-XTS in this process, bit-identical to dm-crypt.
