//! Prometheus metrics of the gateway (`cellmon_gateway_*`).

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open sockets.
    pub connections: IntGauge,
    /// Class subscriptions over all sockets.
    pub subscriptions: IntGauge,
    /// Rooms (classes with at least one subscriber here).
    pub rooms: IntGauge,
    /// Upgrades refused, by reason.
    pub refused: IntCounterVec,
    /// Messages written to sockets, by type.
    pub messages_out: IntCounterVec,
    /// Live messages received from Redis.
    pub messages_in: IntCounter,
    /// Slow sockets, by action (`resync` or `close`).
    pub slow_clients: IntCounterVec,
    /// From a live message's arrival at this gateway to its flush to a
    /// socket.
    pub fanout_seconds: Histogram,
    /// Missed live messages fetched from a class's history.
    pub gap_fills: IntCounter,
    /// Connections to Redis's pub/sub made (1 while all is well).
    pub pubsub_connects: IntCounter,
    /// 1 while the pub/sub connection is subscribed and answering.
    pub pubsub_up: IntGauge,
    /// Pings the pub/sub connection answered.
    pub pubsub_pongs: IntCounter,
    /// 1:1 messages sent, by sender.
    pub direct_messages: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        cellmon_service::metrics::register_common(&registry, "gateway")?;
        let connections =
            IntGauge::new("cellmon_gateway_connections", "Open WebSocket connections")?;
        let subscriptions = IntGauge::new(
            "cellmon_gateway_subscriptions",
            "Class subscriptions over all sockets",
        )?;
        let rooms = IntGauge::new("cellmon_gateway_rooms", "Classes with a subscriber here")?;
        let refused = IntCounterVec::new(
            Opts::new(
                "cellmon_gateway_refused_total",
                "Upgrades refused, by reason",
            ),
            &["reason"],
        )?;
        let messages_out = IntCounterVec::new(
            Opts::new(
                "cellmon_gateway_messages_out_total",
                "Messages written to sockets, by type",
            ),
            &["type"],
        )?;
        let messages_in = IntCounter::new(
            "cellmon_gateway_live_messages_in_total",
            "Live messages received from Redis",
        )?;
        let slow_clients = IntCounterVec::new(
            Opts::new(
                "cellmon_gateway_slow_clients_total",
                "Sockets that fell behind, by action taken",
            ),
            &["action"],
        )?;
        let fanout_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cellmon_gateway_fanout_seconds",
                "From a live message's arrival at the gateway to its flush to a socket",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let gap_fills = IntCounter::new(
            "cellmon_gateway_gap_fills_total",
            "Missed live messages fetched from a class's history",
        )?;
        let pubsub_connects = IntCounter::new(
            "cellmon_gateway_pubsub_connects_total",
            "Connections made to Redis pub/sub",
        )?;
        let pubsub_up = IntGauge::new(
            "cellmon_gateway_pubsub_up",
            "1 while the Redis pub/sub connection is subscribed and answering",
        )?;
        let pubsub_pongs = IntCounter::new(
            "cellmon_gateway_pubsub_pongs_total",
            "Pings the Redis pub/sub connection answered",
        )?;
        let direct_messages = IntCounterVec::new(
            Opts::new(
                "cellmon_gateway_direct_messages_total",
                "1:1 messages sent, by sender",
            ),
            &["sender"],
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(subscriptions.clone()))?;
        registry.register(Box::new(rooms.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(messages_out.clone()))?;
        registry.register(Box::new(messages_in.clone()))?;
        registry.register(Box::new(slow_clients.clone()))?;
        registry.register(Box::new(fanout_seconds.clone()))?;
        registry.register(Box::new(gap_fills.clone()))?;
        registry.register(Box::new(pubsub_connects.clone()))?;
        registry.register(Box::new(pubsub_up.clone()))?;
        registry.register(Box::new(pubsub_pongs.clone()))?;
        registry.register(Box::new(direct_messages.clone()))?;
        Ok(Self {
            registry,
            connections,
            subscriptions,
            rooms,
            refused,
            messages_out,
            messages_in,
            slow_clients,
            fanout_seconds,
            gap_fills,
            pubsub_connects,
            pubsub_up,
            pubsub_pongs,
            direct_messages,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
