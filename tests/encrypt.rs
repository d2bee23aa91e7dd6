//! End-to-end tests of `imgctl encrypt` through a real `imgcryptd` (filled in below).
