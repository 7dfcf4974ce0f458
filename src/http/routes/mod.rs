//! One file per domain: the axum handlers of its endpoints with their OpenAPI annotations. A handler parses the
//! wire form into the core's values, calls the core, and writes the core's answer back in IoT Hub's wire form;
//! core errors become IoT Hub errors through `From` (see [`super::error`]).
//!
//! A new endpoint: copy a neighbour in its domain's file, add it to that file's `router()`, and (for a new literal
//! path segment) to `normalize::ROUTES`.

pub mod c2d;
pub mod d2c;
pub mod feedback;
pub mod ops;
pub mod policies;
pub mod registry;
pub mod websocket;
