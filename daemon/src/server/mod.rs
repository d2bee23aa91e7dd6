//! The Varlink server: listening socket, connections, dispatch.
