//! One device's MQTT connection: CONNECT and its answer, then packets until either side ends it. Generic over the
//! byte stream, so TCP, TLS and WebSockets share it.
//!
//! The hub never holds a lock or transaction while it writes to the network, and never buffers without bound: it
//! reads a packet at a time (at most [`MAX_PACKET_SIZE`]), keeps at most [`MAX_PENDING_PUBLISHES`] telemetry
//! messages waiting for their commit (then stops reading: back-pressure), at most the in-flight bound of C2D
//! deliveries, and a client that stops reading is dropped after [`WRITE_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;
use uuid::Uuid;

use super::codec::{
    self, CodecError, ConnAck, Connect, Packet, Protocol, PubAck, Publish, QoS, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use super::delivery::Delivery;
use super::refusal::{Close, Refusal};
use super::topic::{self, Filter, MAX_TOPIC_LEN};
use super::{messages, Endpoint, CONNECT_TIMEOUT};
use crate::auth::{self, sas::SasToken, DeviceCaller};
use crate::d2c::model::{NewEvent, MAX_MESSAGE_SIZE};
use crate::notify::{channel, Subscription};
use crate::registry::{connection as registry, DeviceId};
use crate::throttle::Operation;

/// A packet's remaining length at most: a full telemetry message with its topic and property bag.
pub const MAX_PACKET_SIZE: usize = MAX_MESSAGE_SIZE + MAX_TOPIC_LEN + 64;
/// Telemetry messages of one connection waiting for their commit.
pub const MAX_PENDING_PUBLISHES: usize = 64;
/// Filters in one SUBSCRIBE or UNSUBSCRIBE.
pub const MAX_FILTERS: usize = 8;
/// How long a write may wait for the client to read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// IoT Hub's longest keep-alive (seconds); 0 or more is taken as this.
pub const MAX_KEEP_ALIVE: u16 = 1177;
/// `lastActivityTime` is written at most this often per connection.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Bytes in and out, a packet at a time.
struct Wire<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    buffer: BytesMut,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite> Wire<S> {
    fn next_packet(&mut self) -> Result<Option<Packet>, CodecError> {
        codec::decode(&mut self.buffer, MAX_PACKET_SIZE)
    }

    /// The next whole packet, reading as needed; `None` when the client closed first.
    async fn read_packet(&mut self) -> Result<Option<Packet>, Close> {
        loop {
            if let Some(packet) = self.next_packet()? {
                return Ok(Some(packet));
            }
            self.buffer.reserve(4096);
            if self.reader.read_buf(&mut self.buffer).await? == 0 {
                return Ok(None);
            }
        }
    }

    async fn send(&mut self, packet: Packet) -> Result<(), Close> {
        self.out.clear();
        codec::encode(&packet, &mut self.out);
        match tokio::time::timeout(WRITE_TIMEOUT, self.writer.write_all(&self.out)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(Close::WriteTimeout),
        }
    }
}

/// Serves one connection from its first byte to its end.
pub async fn run<S>(endpoint: Arc<Endpoint>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let permit = endpoint.sessions.admit();
    let (reader, writer) = tokio::io::split(stream);
    let mut wire = Wire {
        reader,
        writer,
        buffer: BytesMut::with_capacity(4096),
        out: BytesMut::new(),
    };
    let Some(connect) = first_connect(&mut wire).await else {
        return;
    };
    let caller = match authenticate(&endpoint, &connect, permit.is_some()).await {
        Ok(caller) => caller,
        Err(refusal) => {
            tracing::info!(client_id = %connect.client_id, ?refusal, "MQTT CONNECT refused");
            metrics::counter!("iothub_mqtt_refused_connects_total", "code" => format!("{:?}", refusal)).increment(1);
            let _ = wire.send(connack(refusal.code(), false)).await;
            return;
        }
    };
    let will = connect.last_will.as_ref().and_then(|w| {
        messages::will(&caller, &w.topic, w.message.to_vec())
            .map_err(|error| tracing::info!(%error, "MQTT last will ignored"))
            .ok()
    });
    let device = caller.device_id.clone();
    // Before taking the device, so a later connection's take-over cannot slip between the two.
    let session = endpoint
        .notifier
        .subscribe(channel::SESSION, device.as_str());
    let id = Uuid::new_v4();
    let Some(present) = take_device(&endpoint, &mut wire, &device, id, connect.clean_session).await
    else {
        return;
    };
    tracing::debug!(device = %device, clean = connect.clean_session, "MQTT device connected");
    metrics::gauge!("iothub_mqtt_connected_devices").increment(1.0);
    let mut connection = Connection {
        delivery: present.then(|| Delivery::start(&endpoint, &device, QoS::AtLeastOnce)),
        endpoint,
        wire,
        caller,
        id,
        clean_session: connect.clean_session,
        keep_alive: keep_alive(connect.keep_alive),
        pending: FuturesOrdered::new(),
        last_touch: Instant::now(),
    };
    let reason = connection.serve(session).await;
    if reason.is_orderly() {
        tracing::debug!(device = %device, %reason, "MQTT connection ended");
    } else {
        tracing::warn!(device = %device, %reason, "MQTT connection closed");
    }
    metrics::counter!("iothub_mqtt_closes_total", "reason" => reason.kind()).increment(1);
    if let Some(will) = will.filter(|_| reason.sends_will()) {
        connection.send_will(will).await;
    }
    connection.finish().await;
    metrics::gauge!("iothub_mqtt_connected_devices").decrement(1.0);
    drop(permit);
}

/// The client's CONNECT, within [`CONNECT_TIMEOUT`]; anything else first closes the connection (a CONNECT of
/// another protocol version is answered with CONNACK 0x01 first).
async fn first_connect<S: AsyncRead + AsyncWrite>(wire: &mut Wire<S>) -> Option<Connect> {
    let first = match tokio::time::timeout(CONNECT_TIMEOUT, wire.read_packet()).await {
        Ok(Ok(Some(packet))) => packet,
        Ok(Ok(None)) => return None,
        Ok(Err(Close::Codec(CodecError::UnsupportedProtocol(what)))) => {
            tracing::debug!(%what, "MQTT CONNECT of another protocol version refused");
            let _ = wire.send(connack(Refusal::Protocol.code(), false)).await;
            return None;
        }
        Ok(Err(close)) => {
            tracing::debug!(reason = %close, "MQTT connection closed before CONNECT");
            return None;
        }
        Err(_) => {
            tracing::debug!("no MQTT CONNECT in time");
            return None;
        }
    };
    match first {
        Packet::Connect(connect) => Some(connect),
        _ => {
            tracing::debug!("MQTT connection closed: the first packet was not CONNECT");
            None
        }
    }
}

/// Makes connection `id` the device's and answers CONNACK; whether a stored C2D subscription is in force
/// (session present), or `None` when the connection ends here.
async fn take_device<S: AsyncRead + AsyncWrite>(
    endpoint: &Endpoint,
    wire: &mut Wire<S>,
    device: &DeviceId,
    id: Uuid,
    clean_session: bool,
) -> Option<bool> {
    let refusal = match registry::take(&endpoint.db, device, id, clean_session).await {
        Ok(Some(taken)) => {
            let present = !clean_session && taken.c2d_subscribed;
            let accepted = connack(codec::ConnectReturnCode::Success, present);
            if wire.send(accepted).await.is_ok() {
                return Some(present);
            }
            let _ = registry::release(&endpoint.db, device, id).await;
            return None;
        }
        // Deleted between authentication and now.
        Ok(None) => Refusal::NotAuthorized,
        Err(error) => {
            tracing::warn!(%error, "MQTT CONNECT: the database is unavailable");
            Refusal::Unavailable
        }
    };
    let _ = wire.send(connack(refusal.code(), false)).await;
    None
}

fn connack(code: codec::ConnectReturnCode, session_present: bool) -> Packet {
    Packet::ConnAck(ConnAck::new(code, session_present))
}

/// 1.5 times the client's keep-alive, IoT Hub's longest when it asks for none or more.
fn keep_alive(seconds: u16) -> Duration {
    let seconds = if seconds == 0 || seconds > MAX_KEEP_ALIVE {
        MAX_KEEP_ALIVE
    } else {
        seconds
    };
    Duration::from_millis(u64::from(seconds) * 1500)
}

/// Checks CONNECT as IoT Hub does: client id = device id, user name `{host}/{deviceId}/?api-version=…[&…]`,
/// password a SAS token that may connect the device (the same check as HTTPS).
async fn authenticate(
    endpoint: &Endpoint,
    connect: &Connect,
    admitted: bool,
) -> Result<DeviceCaller, Refusal> {
    if connect.protocol != Protocol::V4 {
        return Err(Refusal::Protocol);
    }
    if !admitted || *endpoint.shutdown.borrow() {
        return Err(Refusal::Unavailable);
    }
    let device: DeviceId = connect.client_id.parse().map_err(|_| Refusal::ClientId)?;
    let login = connect.login.as_ref().ok_or(Refusal::BadCredentials)?;
    let mut user = login.username.split('/');
    let (_host, named) = (user.next(), user.next());
    if named != Some(device.as_str()) {
        return Err(Refusal::BadCredentials);
    }
    if SasToken::parse(&login.password).is_err() {
        return Err(Refusal::BadCredentials);
    }
    let target = ["devices".to_string(), device.as_str().to_string()];
    Ok(auth::authorize_device(
        &endpoint.credentials,
        &endpoint.hostname,
        Some(&login.password),
        device.as_str(),
        &target,
    )
    .await?)
}

/// What woke the connection.
enum Event {
    Read(std::io::Result<usize>),
    Committed(Result<Option<u16>, crate::d2c::Error>),
    C2d,
    Session,
    KeepAlive,
    Shutdown,
}

type Commit = BoxFuture<'static, Result<Option<u16>, crate::d2c::Error>>;

struct Connection<S> {
    endpoint: Arc<Endpoint>,
    wire: Wire<S>,
    caller: DeviceCaller,
    id: Uuid,
    clean_session: bool,
    keep_alive: Duration,
    /// Telemetry submitted, in arrival order, each with the packet id to acknowledge once committed.
    pending: FuturesOrdered<Commit>,
    /// Set while the device subscribes to its C2D messages.
    delivery: Option<Delivery>,
    last_touch: Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Connection<S> {
    async fn serve(&mut self, mut session: Subscription) -> Close {
        match self.serve_until_closed(&mut session).await {
            Ok(()) => Close::Disconnected,
            Err(reason) => reason,
        }
    }

    async fn serve_until_closed(&mut self, session: &mut Subscription) -> Result<(), Close> {
        let mut shutdown = self.endpoint.shutdown.clone();
        let mut deadline = Instant::now() + self.keep_alive;
        self.deliver().await?;
        loop {
            while let Some(packet) = self.wire.next_packet()? {
                if !self.on_packet(packet).await? {
                    return Ok(());
                }
            }
            // While telemetry waits for its commit the client is not read (back-pressure), nor held to its
            // keep-alive: what it sent meanwhile is still unread.
            let reading = self.pending.len() < MAX_PENDING_PUBLISHES;
            let delivery = &mut self.delivery;
            // Biased: the events that come one at a time first (a flood of bytes cannot starve them), and bytes
            // already sent count as activity before an expired keep-alive is believed.
            let event = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => Event::Shutdown,
                Some(done) = self.pending.next(), if !self.pending.is_empty() => Event::Committed(done),
                _ = woken(delivery) => Event::C2d,
                _ = session.changed() => Event::Session,
                read = self.wire.reader.read_buf(&mut self.wire.buffer), if reading => Event::Read(read),
                _ = tokio::time::sleep_until(deadline), if reading => Event::KeepAlive,
            };
            if !reading {
                deadline = Instant::now() + self.keep_alive;
            }
            match event {
                Event::Read(read) => {
                    if read? == 0 {
                        return Err(Close::Dropped);
                    }
                    deadline = Instant::now() + self.keep_alive;
                    self.wire.buffer.reserve(4096);
                    self.touch().await;
                }
                Event::Committed(done) => self.committed(done).await?,
                Event::C2d => self.deliver().await?,
                Event::Session => self.check_still_held().await?,
                Event::KeepAlive => return Err(Close::KeepAlive),
                Event::Shutdown => return Err(Close::ShuttingDown),
            }
        }
    }

    /// Handles one packet; `false` when the client disconnected.
    async fn on_packet(&mut self, packet: Packet) -> Result<bool, Close> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish).await?,
            Packet::PubAck(ack) => {
                if let Some(delivery) = &mut self.delivery {
                    delivery.acknowledge(&self.endpoint, ack.pkid).await?;
                }
                self.deliver().await?;
            }
            Packet::Subscribe(subscribe) => {
                if subscribe.filters.len() > MAX_FILTERS {
                    return Err(Close::TooManyFilters(MAX_FILTERS));
                }
                let device = &self.caller.device_id;
                let mut c2d = None;
                let codes = subscribe
                    .filters
                    .iter()
                    .map(|f| match topic::filter(device, &f.path) {
                        Filter::C2d => {
                            // QoS 0 if asked, else 1: C2D messages are never sent at QoS 2.
                            let granted = match f.qos {
                                QoS::AtMostOnce => QoS::AtMostOnce,
                                _ => QoS::AtLeastOnce,
                            };
                            c2d = Some(granted);
                            SubscribeReasonCode::Success(granted)
                        }
                        Filter::Refused => SubscribeReasonCode::Failure,
                    })
                    .collect();
                self.wire
                    .send(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
                    .await?;
                if let Some(qos) = c2d {
                    self.subscribe_c2d(qos).await?;
                }
            }
            Packet::Unsubscribe(unsubscribe) => {
                if unsubscribe.topics.len() > MAX_FILTERS {
                    return Err(Close::TooManyFilters(MAX_FILTERS));
                }
                let device = &self.caller.device_id;
                if unsubscribe
                    .topics
                    .iter()
                    .any(|t| topic::filter(device, t) == Filter::C2d)
                {
                    self.unsubscribe_c2d().await?;
                }
                self.wire
                    .send(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)))
                    .await?;
            }
            Packet::PingReq => self.wire.send(Packet::PingResp).await?,
            Packet::Disconnect => return Ok(false),
            Packet::Connect(_) => return Err(Close::Unexpected("second CONNECT")),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => return Err(Close::QoS2),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                return Err(Close::Unexpected("server-to-client"))
            }
        }
        Ok(true)
    }

    /// Telemetry: parsed and stamped here, committed by the partition's writer (group commit); acknowledged in
    /// order once committed ([`Connection::committed`]).
    async fn on_publish(&mut self, publish: Publish) -> Result<(), Close> {
        if publish.qos == QoS::ExactlyOnce {
            return Err(Close::QoS2);
        }
        let bag = topic::events_bag(&self.caller.device_id, &publish.topic)?;
        let event = messages::telemetry(&self.caller, bag, publish.payload.to_vec())?;
        // Over its rate the message waits (and the connection is not read meanwhile): MQTT has no 429.
        let device = self.caller.device_id.as_str();
        while let Err(throttled) = self
            .endpoint
            .throttle
            .check(Operation::D2cSend, Some(device))
        {
            tokio::time::sleep(throttled.wait.max(Duration::from_millis(1))).await;
        }
        while self.pending.len() >= MAX_PENDING_PUBLISHES {
            if let Some(done) = self.pending.next().await {
                self.committed(done).await?;
            }
        }
        let ack = (publish.qos == QoS::AtLeastOnce).then_some(publish.pkid);
        let d2c = self.endpoint.d2c.clone();
        let partition = d2c.partition_of(self.caller.device_id.as_str());
        self.pending.push_back(Box::pin(async move {
            d2c.ingest.submit(partition, vec![event]).await.map(|_| ack)
        }));
        Ok(())
    }

    async fn committed(
        &mut self,
        done: Result<Option<u16>, crate::d2c::Error>,
    ) -> Result<(), Close> {
        match done.map_err(Close::Telemetry)? {
            Some(pkid) => self.wire.send(Packet::PubAck(PubAck::new(pkid))).await,
            None => Ok(()),
        }
    }

    async fn subscribe_c2d(&mut self, qos: QoS) -> Result<(), Close> {
        let device = &self.caller.device_id;
        match &mut self.delivery {
            Some(delivery) => delivery.set_qos(qos),
            None => self.delivery = Some(Delivery::start(&self.endpoint, device, qos)),
        }
        if !self.clean_session {
            // A persistent session keeps a QoS 1 subscription only: at-most-once ends with the connection.
            let kept = qos == QoS::AtLeastOnce;
            registry::remember_c2d_subscription(&self.endpoint.db, device, self.id, kept).await?;
        }
        self.deliver().await
    }

    async fn unsubscribe_c2d(&mut self) -> Result<(), Close> {
        if let Some(delivery) = self.delivery.take() {
            delivery.release(&self.endpoint).await;
        }
        if !self.clean_session {
            registry::remember_c2d_subscription(
                &self.endpoint.db,
                &self.caller.device_id,
                self.id,
                false,
            )
            .await?;
        }
        Ok(())
    }

    /// Publishes what the device's queue has for it, within the in-flight bound.
    async fn deliver(&mut self) -> Result<(), Close> {
        let at_most_once = self
            .delivery
            .as_ref()
            .is_some_and(|d| d.qos() == QoS::AtMostOnce);
        loop {
            let Some(delivery) = &mut self.delivery else {
                return Ok(());
            };
            let publishes = delivery.fill(&self.endpoint).await?;
            if publishes.is_empty() {
                return Ok(());
            }
            for (lease, publish) in publishes {
                self.wire.send(Packet::Publish(publish)).await?;
                if at_most_once {
                    // Written: at QoS 0 that is delivered, so it completes (after the write, never before).
                    if let Some(delivery) = &mut self.delivery {
                        delivery.acknowledge(&self.endpoint, lease).await?;
                    }
                }
            }
            // At QoS 1 the in-flight bound is reached or the queue is empty; at QoS 0 nothing stays in flight.
            if !at_most_once {
                return Ok(());
            }
        }
    }

    /// After a session notification: closes when another connection now holds the device, or the device was
    /// disabled or deleted.
    async fn check_still_held(&mut self) -> Result<(), Close> {
        match registry::holder(&self.endpoint.db, &self.caller.device_id).await {
            Ok(Some(holder)) if holder == self.id => Ok(()),
            Ok(Some(_)) => Err(Close::TakenOver),
            Ok(None) => Err(Close::DeviceGone),
            Err(error) => {
                tracing::warn!(%error, "cannot check which connection holds the device");
                Ok(())
            }
        }
    }

    /// Stores the device's last will as telemetry (it dropped without DISCONNECT).
    async fn send_will(&mut self, will: NewEvent) {
        let d2c = &self.endpoint.d2c;
        let partition = d2c.partition_of(self.caller.device_id.as_str());
        if let Err(error) = d2c.ingest.submit(partition, vec![will]).await {
            tracing::warn!(%error, "MQTT last will not stored");
        }
    }

    /// `lastActivityTime`, written at most every [`TOUCH_EVERY`].
    async fn touch(&mut self) {
        if self.last_touch.elapsed() < TOUCH_EVERY {
            return;
        }
        self.last_touch = Instant::now();
        if let Err(error) = registry::touch(&self.endpoint.db, &self.caller.device_id).await {
            tracing::debug!(%error, "lastActivityTime not written");
        }
    }

    /// After the last packet: acknowledges telemetry still committing when the socket still takes it, releases C2D
    /// leases, and marks the device Disconnected unless another connection took it.
    async fn finish(mut self) {
        let drain = async {
            while let Some(done) = self.pending.next().await {
                if self.committed(done).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, drain).await;
        if let Some(delivery) = self.delivery.take() {
            delivery.release(&self.endpoint).await;
        }
        let device = &self.caller.device_id;
        if let Err(error) = registry::release(&self.endpoint.db, device, self.id).await {
            tracing::warn!(%error, "connection state not written");
        }
        let _ = self.wire.writer.shutdown().await;
    }
}

/// Resolves when the C2D delivery (if any) may have something to publish; never without one.
async fn woken(delivery: &mut Option<Delivery>) {
    match delivery {
        Some(delivery) => delivery.woken().await,
        None => std::future::pending().await,
    }
}
