//! LUKS headers through libcryptsetup, formatted on daemon-owned memory, and the layout rule.
