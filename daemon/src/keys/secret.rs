//! Memory for secrets: locked (never swapped), excluded from core dumps, zeroised on drop.
