//! MQTT 3.1.1 packets on the wire: rumqttc's `mqttbytes::v4` codec (parsing and writing; no client, no event
//! loop), behind the two calls the connection needs, with the hub's size bound and errors in its own terms.

use bytes::BytesMut;
pub use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::Error as Wire;
pub use rumqttc::mqttbytes::{Protocol, QoS};

/// Why bytes from a client are no packet the hub takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    /// A CONNECT of a protocol version other than 3.1.1 (level 4): CONNACK 0x01 answers it.
    #[error("unsupported protocol {0}")]
    UnsupportedProtocol(String),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// The next whole packet at the front of `buffer` (taken out of it), or `None` when more bytes are needed.
/// `max_size` bounds a packet's remaining length: a larger one is refused from its header, before its body is read.
pub fn decode(buffer: &mut BytesMut, max_size: usize) -> Result<Option<Packet>, CodecError> {
    // MQTT 5's CONNECT has more fields than 3.1.1's: look at its level before parsing it as 3.1.1.
    if let Some(level) = connect_level(buffer) {
        if level != 4 {
            return Err(CodecError::UnsupportedProtocol(format!("level {level}")));
        }
    }
    match Packet::read(buffer, max_size) {
        Ok(packet) => Ok(Some(packet)),
        Err(Wire::InsufficientBytes(_)) => Ok(None),
        Err(Wire::PayloadSizeLimitExceeded(size)) => Err(CodecError::TooLarge(size)),
        Err(Wire::InvalidProtocolLevel(level)) => {
            Err(CodecError::UnsupportedProtocol(format!("level {level}")))
        }
        // MQTT 3.1 names itself "MQIsdp".
        Err(Wire::InvalidProtocol) => Err(CodecError::UnsupportedProtocol("name".into())),
        Err(other) => Err(CodecError::Malformed(other.to_string())),
    }
}

/// The protocol level of the CONNECT at the front of `buffer`, once its bytes are there.
fn connect_level(buffer: &[u8]) -> Option<u8> {
    if buffer.first()? >> 4 != 1 {
        return None;
    }
    // Fixed header: type, then 1–4 bytes of remaining length (the last has its high bit clear).
    let length_bytes = buffer[1..].iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let variable = &buffer[1 + length_bytes..];
    let name_len = usize::from(u16::from_be_bytes([*variable.first()?, *variable.get(1)?]));
    variable.get(2 + name_len).copied()
}

/// Appends `packet` to `out`. The hub writes only packets it built within MQTT's limits.
pub fn encode(packet: &Packet, out: &mut BytesMut) {
    if let Err(error) = packet.write(out, usize::MAX) {
        // Unreachable for the packets the hub builds (non-zero packet ids, topics under 64 KiB).
        tracing::error!(%error, "an MQTT packet could not be written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(packet: &Packet) -> BytesMut {
        let mut out = BytesMut::new();
        encode(packet, &mut out);
        out
    }

    #[test]
    fn reads_packets_split_anywhere_and_bounds_their_size() {
        let mut connect = Connect::new("dev");
        connect.set_login("host/dev/?api-version=2021-04-12", "token");
        let whole = bytes(&Packet::Connect(connect.clone()));
        for cut in 0..whole.len() {
            let mut buffer = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut buffer, 1024), Ok(None), "cut at {cut}");
            buffer.extend_from_slice(&whole[cut..]);
            assert_eq!(
                decode(&mut buffer, 1024),
                Ok(Some(Packet::Connect(connect.clone())))
            );
            assert!(buffer.is_empty());
        }
        let publish = Packet::Publish(Publish::new("t", QoS::AtLeastOnce, vec![0u8; 100]));
        let mut big = bytes(&publish);
        assert!(matches!(decode(&mut big, 50), Err(CodecError::TooLarge(_))));
    }

    #[test]
    fn names_other_protocol_versions() {
        let mut v31 = bytes(&Packet::Connect(Connect::new("dev")));
        // Protocol level byte: fixed header (2) + name length (2) + "MQTT" (4).
        v31[8] = 3;
        assert!(matches!(
            decode(&mut v31, 1024),
            Err(CodecError::UnsupportedProtocol(_))
        ));
        let mut v5 = bytes(&Packet::Connect(Connect::new("dev")));
        v5[8] = 5;
        assert_eq!(
            decode(&mut v5, 1024),
            Err(CodecError::UnsupportedProtocol("level 5".into()))
        );
        // Known before the whole packet is there.
        let mut head = BytesMut::from(&v5[..9]);
        assert!(matches!(
            decode(&mut head, 1024),
            Err(CodecError::UnsupportedProtocol(_))
        ));
        let mut short = BytesMut::from(&v5[..5]);
        assert_eq!(decode(&mut short, 1024), Ok(None));
    }
}
