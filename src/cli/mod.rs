//! The command-line client: REST calls to a running hub (devices, C2D, feedback, telemetry send and monitor).
//! It speaks only the hub's HTTP API, through [`client`].

pub mod c2d;
pub mod client;
pub mod d2c;
