//! AES-XTS-plain64 exactly as dm-crypt computes it.
