//! zbus v1, wire-compatible with Go `threefoldtech/zbus` v1.0.1.

pub mod broker;
pub mod client;
pub mod codec;
pub mod keyed;
pub mod server;
pub mod wire;
