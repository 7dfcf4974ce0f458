//! MQTT over WebSockets (`/$iothub/websocket`, subprotocol `mqtt`), as IoT Hub serves it on port 443: the
//! WebSocket's binary frames are a byte stream (a frame may hold part of a packet or several) handed to the MQTT
//! endpoint, which serves it like a TCP connection.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::AppState;
use crate::mqtt::Endpoint;

/// Bytes buffered between the WebSocket and the MQTT connection in each direction: when full, the side that
/// writes waits (back-pressure), so a client that stops reading cannot grow the hub's memory.
const BRIDGE_BUFFER: usize = 64 * 1024;
/// Largest WebSocket message taken: a whole MQTT packet of the largest size fits in one.
const MAX_FRAME: usize = crate::mqtt::connection::MAX_PACKET_SIZE + 16;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(websocket))
}

/// MQTT over WebSockets: upgrade with `Sec-WebSocket-Protocol: mqtt`, then speak MQTT 3.1.1 in binary frames
/// (CONNECT authenticates, as on port 8883; see docs/mqtt.md).
#[utoipa::path(get, path = "/$iothub/websocket", tag = "operations",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol `mqtt`"),
        (status = 400, description = "Not a WebSocket upgrade request"),
    ))]
async fn websocket(upgrade: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    let endpoint = state.mqtt.clone();
    upgrade
        .protocols(["mqtt"])
        .max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .on_upgrade(move |socket| bridge(socket, endpoint))
}

/// Pumps bytes between the WebSocket and the MQTT connection until either ends. Once the MQTT connection has
/// ended, what it wrote last has the write timeout to reach the client: a client that does not read cannot keep
/// the WebSocket (and this task) for ever.
async fn bridge(socket: WebSocket, endpoint: Arc<Endpoint>) {
    let write_timeout = endpoint.settings.write_timeout();
    let (hub_side, mqtt_side) = tokio::io::duplex(BRIDGE_BUFFER);
    let mut connection = tokio::spawn(endpoint.serve(mqtt_side));
    let (mut from_hub, mut to_hub) = tokio::io::split(hub_side);
    let (mut to_client, mut from_client) = socket.split();
    let inbound = async move {
        while let Some(Ok(message)) = from_client.next().await {
            let bytes = match message {
                Message::Binary(bytes) => bytes,
                Message::Close(_) => break,
                // Text frames are no MQTT; pings are answered by the WebSocket layer.
                _ => continue,
            };
            if to_hub.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to_hub.shutdown().await;
    };
    let outbound = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n) = from_hub.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            let frame = Message::Binary(Bytes::copy_from_slice(&buffer[..n]));
            if to_client.send(frame).await.is_err() {
                break;
            }
        }
        let _ = to_client.close().await;
    };
    tokio::pin!(outbound);
    tokio::pin!(inbound);
    let mut inbound_open = true;
    let connection_ended = loop {
        tokio::select! {
            _ = &mut outbound => break false,
            _ = &mut inbound, if inbound_open => inbound_open = false,
            _ = &mut connection => break true,
        }
    };
    if connection_ended {
        let _ = tokio::time::timeout(write_timeout, outbound).await;
    } else {
        let _ = connection.await;
    }
}
