//! Declaring or checking queues, exchanges and bindings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use redeliver_core::{Error, Topology};
use tracing::warn;

use crate::errors;
use crate::naming::{Destination, Names, check_destination, destination_pattern, level_pattern};
use crate::options::{DelayMode, QueueType, RabbitMqOptions, TopologyMode};

/// Where and how a topology is declared: the transport's settings and one open connection.
pub(crate) struct On<'a> {
    pub(crate) options: &'a RabbitMqOptions,
    pub(crate) names: &'a Names,
    pub(crate) connection: &'a Connection,
    /// Whether the delay infrastructure was declared on this connection; set once it is.
    pub(crate) infrastructure_ready: &'a AtomicBool,
}

/// Declares (or checks) `topology` and the delay infrastructure.
pub(crate) async fn apply(on: On<'_>, topology: &Topology) -> Result<(), Error> {
    let channel = on
        .connection
        .create_channel()
        .await
        .map_err(|e| errors::from_client(e, "opening a channel to declare the topology"))?;
    let mut declarer = Declarer {
        channel,
        check_only: on.options.topology == TopologyMode::CheckOnly,
        on,
    };
    let result = declarer.apply(topology).await;
    if declarer.channel.status().connected() {
        let _ = declarer.channel.close(200, "declared".into()).await;
    }
    result
}

struct Declarer<'a> {
    channel: Channel,
    on: On<'a>,
    check_only: bool,
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

fn millis(duration: Duration) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX))
}

/// Quorum-queue arguments for a queue that dead-letters: at-least-once dead-lettering (the
/// message stays until the dead-letter target confirmed it), which requires reject-publish.
fn at_least_once(args: &mut FieldTable) {
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
}

impl Declarer<'_> {
    async fn apply(&mut self, topology: &Topology) -> Result<(), Error> {
        let options = self.on.options;
        let names = self.on.names;
        if let Some(levels) = names.levels()
            && !self.on.infrastructure_ready.load(Ordering::Relaxed)
        {
            self.cascade(levels).await?;
            self.on.infrastructure_ready.store(true, Ordering::Relaxed);
        }

        let limit = options
            .delivery_limit()
            .map(|limit| ("x-delivery-limit", AMQPValue::LongLongInt(limit.into())));
        for endpoint in topology.endpoints() {
            let queue = names.endpoint_queue(endpoint);
            let dead = names.dead_letter_queue(endpoint);
            let quarantine = names.quarantine_queue(endpoint);
            let mut args = self.queue_args(options.queue_type);
            args.insert("x-dead-letter-exchange".into(), text(""));
            args.insert("x-dead-letter-routing-key".into(), text(&dead));
            if options.queue_type == QueueType::Quorum {
                at_least_once(&mut args);
            }
            // What versions without a default delivery limit declared: still accepted (with a
            // warning) when only the defaults differ, so that an upgrade does not stop on
            // queues that already exist.
            let legacy = options.delivery_limit_is_default().then(|| args.clone());
            if let Some((key, value)) = &limit {
                args.insert((*key).into(), value.clone());
            }
            // The endpoint's queue first: check-only mode names the one users know.
            self.queue_or_legacy(&queue, args, legacy).await?;
            let mut dead_args = self.queue_args(options.queue_type);
            dead_args.insert("x-dead-letter-exchange".into(), text(""));
            dead_args.insert("x-dead-letter-routing-key".into(), text(&quarantine));
            if options.queue_type == QueueType::Quorum {
                at_least_once(&mut dead_args);
            }
            if let Some((key, value)) = &limit {
                dead_args.insert((*key).into(), value.clone());
            }
            let legacy = Some(self.queue_args(options.queue_type));
            self.queue_or_legacy(&dead, dead_args, legacy).await?;
            // Read by none of the framework's readers: a message that poisoned the dead-letter
            // queue's readers ends here, for an operator. Not checked in check-only mode,
            // where topologies provisioned before it existed must still pass.
            if !self.check_only {
                self.queue(&quarantine, self.queue_args(options.queue_type))
                    .await?;
            }
            for q in [&queue, &dead] {
                match &options.delays {
                    DelayMode::Cascade { levels } => {
                        check_destination(*levels, Destination::Queue(q))?;
                        self.bind_queue(
                            q,
                            &names.delivery_exchange(*levels),
                            &destination_pattern(*levels, Destination::Queue(q)),
                        )
                        .await?;
                    }
                    DelayMode::FixedTtlRetryQueue { ttl, .. } => {
                        let retry = names.retry_queue(q).expect("fixed-TTL mode");
                        let mut args = self.queue_args(options.queue_type);
                        args.insert("x-message-ttl".into(), millis(*ttl));
                        args.insert("x-dead-letter-exchange".into(), text(""));
                        args.insert("x-dead-letter-routing-key".into(), text(q));
                        if options.queue_type == QueueType::Quorum {
                            at_least_once(&mut args);
                        }
                        self.queue(&retry, args).await?;
                    }
                }
            }
        }

        for (topic, endpoints) in topology.topics() {
            let exchange = names.topic_exchange(topic);
            self.exchange(&exchange, ExchangeKind::Fanout, FieldTable::default())
                .await?;
            for endpoint in endpoints {
                self.bind_queue(&names.endpoint_queue(endpoint), &exchange, "")
                    .await?;
            }
        }
        Ok(())
    }

    /// The levels, the delivery exchange and its alternate exchange for unroutable messages.
    async fn cascade(&mut self, levels: u8) -> Result<(), Error> {
        let names = self.on.names;
        let unroutable = names.unroutable();
        self.exchange(&unroutable, ExchangeKind::Fanout, FieldTable::default())
            .await?;
        self.queue(&unroutable, self.queue_args(QueueType::Quorum))
            .await?;
        self.bind_queue(&unroutable, &unroutable, "").await?;
        let mut args = FieldTable::default();
        args.insert("alternate-exchange".into(), text(&unroutable));
        self.exchange(&names.delivery_exchange(levels), ExchangeKind::Topic, args)
            .await?;
        for level in 0..levels {
            let name = names.level(levels, level);
            let below = names.below(levels, level);
            self.exchange(&name, ExchangeKind::Topic, FieldTable::default())
                .await?;
            let mut args = self.queue_args(QueueType::Quorum);
            args.insert(
                "x-message-ttl".into(),
                millis(Duration::from_secs(1u64 << level)),
            );
            // No routing-key override: the key carries the remaining bits and the destination.
            args.insert("x-dead-letter-exchange".into(), text(&below));
            at_least_once(&mut args);
            self.queue(&name, args).await?;
            self.bind_queue(&name, &name, &level_pattern(levels, level, true))
                .await?;
            self.bind_exchange(&below, &name, &level_pattern(levels, level, false))
                .await?;
        }
        Ok(())
    }

    fn queue_args(&self, queue_type: QueueType) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text(queue_type.as_str()));
        args
    }

    /// Declares queue `name` with `args`, or, if the broker refuses because the queue exists
    /// with other arguments, with `legacy` (the arguments earlier versions gave it), warning
    /// that it lacks the poison-message protection.
    async fn queue_or_legacy(
        &mut self,
        name: &str,
        args: FieldTable,
        legacy: Option<FieldTable>,
    ) -> Result<(), Error> {
        let error = match self.queue(name, args).await {
            Err(error @ Error::Config { .. }) => error,
            other => return other,
        };
        let Some(legacy) = legacy.filter(|_| !self.check_only) else {
            return Err(error);
        };
        // The refusal closed the channel.
        self.channel = self
            .on
            .connection
            .create_channel()
            .await
            .map_err(|e| errors::from_client(e, "opening a channel to declare the topology"))?;
        if self.queue(name, legacy).await.is_err() {
            return Err(error);
        }
        warn!(
            queue = name,
            "the queue exists without the delivery limit or the dead-lettering into quarantine \
             this version declares, so a message no client can read is delivered again for \
             ever; delete and declare the queue again (or add them with a policy)"
        );
        self.channel = self
            .on
            .connection
            .create_channel()
            .await
            .map_err(|e| errors::from_client(e, "opening a channel to declare the topology"))?;
        Ok(())
    }

    async fn queue(&mut self, name: &str, args: FieldTable) -> Result<(), Error> {
        let options = QueueDeclareOptions {
            passive: self.check_only,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let args = if self.check_only {
            FieldTable::default()
        } else {
            args
        };
        self.channel
            .queue_declare(name.into(), options, args)
            .await
            .map(drop)
            .map_err(|e| self.failed(e, "queue", name))
    }

    async fn exchange(
        &mut self,
        name: &str,
        kind: ExchangeKind,
        args: FieldTable,
    ) -> Result<(), Error> {
        let options = ExchangeDeclareOptions {
            passive: self.check_only,
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let args = if self.check_only {
            FieldTable::default()
        } else {
            args
        };
        self.channel
            .exchange_declare(name.into(), kind, options, args)
            .await
            .map_err(|e| self.failed(e, "exchange", name))
    }

    async fn bind_queue(&mut self, queue: &str, exchange: &str, key: &str) -> Result<(), Error> {
        if self.check_only {
            return Ok(());
        }
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                errors::from_client(
                    e,
                    format!("binding queue `{queue}` to exchange `{exchange}` with `{key}`"),
                )
            })
    }

    async fn bind_exchange(
        &mut self,
        destination: &str,
        source: &str,
        key: &str,
    ) -> Result<(), Error> {
        if self.check_only {
            return Ok(());
        }
        self.channel
            .exchange_bind(
                destination.into(),
                source.into(),
                key.into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                errors::from_client(
                    e,
                    format!("binding exchange `{destination}` to exchange `{source}` with `{key}`"),
                )
            })
    }

    fn failed(&self, error: lapin::Error, what: &'static str, name: &str) -> Error {
        if errors::is_not_found(&error) {
            return Error::not_found(what, name.to_owned()).with_hint(if self.check_only {
                "the transport only checks the topology (TopologyMode::CheckOnly); create it \
                     on the broker or switch to TopologyMode::Declare"
                    .to_owned()
            } else {
                "the broker reported it missing while declaring".to_owned()
            });
        }
        errors::from_client(error, format!("declaring {what} `{name}`"))
    }
}
