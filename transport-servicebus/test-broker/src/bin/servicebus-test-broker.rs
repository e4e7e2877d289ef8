//! Runs the Service Bus test broker until Ctrl-C, with entities from command-line flags, and
//! prints its connection string.

use std::process::ExitCode;
use std::time::Duration;

use redeliver_servicebus_testbroker::{
    BrokerOptions, QueueOptions, SubscriptionOptions, TopicOptions, start,
};

const USAGE: &str = "\
usage: servicebus-test-broker [--address IP:PORT] [--latency MS] [ENTITY...]

entities:
  --queue NAME[,lock=SECS][,max-delivery=N][,max-size=BYTES][,duplicate-window=SECS]
               [,ttl=SECS][,expired-to-dlq=true]
  --topic NAME[,max-size=BYTES][,duplicate-window=SECS]
  --subscription TOPIC/NAME[,lock=SECS][,max-delivery=N][,subject=S][,forward-to=QUEUE]
               [,ttl=SECS][,expired-to-dlq=true]

Without --address the broker listens on the first free 127.0.0.x:5672 (x >= 2), because
azservicebus always dials port 5672. --latency delays every frame to a client by MS
milliseconds, as over the network to a real namespace. The connection string is printed on
standard output.";

enum Entity {
    Queue(String, QueueOptions),
    Topic(String, TopicOptions),
    Subscription(String, String, SubscriptionOptions),
}

fn parse_options(spec: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut parts = spec.split(',');
    let name = parts.next().unwrap_or_default().to_owned();
    let options = parts
        .map(|part| {
            part.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("option `{part}` of `{spec}` is not KEY=VALUE"))
        })
        .collect::<Result<_, _>>()?;
    Ok((name, options))
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{key}={value}: not a number"))
}

fn boolean(key: &str, value: &str) -> Result<bool, String> {
    value
        .parse()
        .map_err(|_| format!("{key}={value}: not true or false"))
}

fn parse_entity(flag: &str, spec: &str) -> Result<Entity, String> {
    let (name, options) = parse_options(spec)?;
    match flag {
        "--queue" => {
            let mut queue = QueueOptions::default();
            for (key, value) in options {
                queue = match key.as_str() {
                    "lock" => {
                        queue.with_lock_duration(Duration::from_secs_f64(number(&key, &value)?))
                    }
                    "max-delivery" => queue.with_max_delivery_count(number(&key, &value)?),
                    "max-size" => queue.with_max_message_size(number(&key, &value)?),
                    "duplicate-window" => queue
                        .with_duplicate_detection(Duration::from_secs_f64(number(&key, &value)?)),
                    "ttl" => queue.with_default_message_time_to_live(Duration::from_secs_f64(
                        number(&key, &value)?,
                    )),
                    "expired-to-dlq" => {
                        queue.with_dead_lettering_on_message_expiration(boolean(&key, &value)?)
                    }
                    _ => return Err(format!("unknown queue option `{key}`")),
                };
            }
            Ok(Entity::Queue(name, queue))
        }
        "--topic" => {
            let mut topic = TopicOptions::default();
            for (key, value) in options {
                topic = match key.as_str() {
                    "max-size" => topic.with_max_message_size(number(&key, &value)?),
                    "duplicate-window" => topic
                        .with_duplicate_detection(Duration::from_secs_f64(number(&key, &value)?)),
                    _ => return Err(format!("unknown topic option `{key}`")),
                };
            }
            Ok(Entity::Topic(name, topic))
        }
        "--subscription" => {
            let (topic, sub) = name
                .split_once('/')
                .ok_or_else(|| format!("subscription `{name}` must be TOPIC/NAME"))?;
            let mut subscription = SubscriptionOptions::default();
            for (key, value) in options {
                subscription = match key.as_str() {
                    "lock" => subscription
                        .with_lock_duration(Duration::from_secs_f64(number(&key, &value)?)),
                    "max-delivery" => subscription.with_max_delivery_count(number(&key, &value)?),
                    "subject" => subscription.with_subject_filter(value),
                    "forward-to" => subscription.with_forward_to(value),
                    "ttl" => subscription.with_default_message_time_to_live(
                        Duration::from_secs_f64(number(&key, &value)?),
                    ),
                    "expired-to-dlq" => subscription
                        .with_dead_lettering_on_message_expiration(boolean(&key, &value)?),
                    _ => return Err(format!("unknown subscription option `{key}`")),
                };
            }
            Ok(Entity::Subscription(
                topic.to_owned(),
                sub.to_owned(),
                subscription,
            ))
        }
        _ => Err(format!("unknown flag `{flag}`")),
    }
}

fn parse_args() -> Result<(BrokerOptions, Vec<Entity>), String> {
    let mut options = BrokerOptions::default();
    let mut entities = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("flag `{flag}` needs a value"))?;
        if flag == "--address" {
            options = options.with_address(
                value
                    .parse()
                    .map_err(|_| format!("--address {value}: not IP:PORT"))?,
            );
        } else if flag == "--latency" {
            options = options.with_latency(Duration::from_millis(number(&flag, &value)?));
        } else {
            entities.push(parse_entity(&flag, &value)?);
        }
    }
    Ok((options, entities))
}

#[tokio::main]
async fn main() -> ExitCode {
    let (options, entities) = match parse_args() {
        Ok(parsed) => parsed,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("error: {message}\n");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let broker = match start(options).await {
        Ok(broker) => broker,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    for entity in entities {
        let result = match entity {
            Entity::Queue(name, options) => broker.create_queue(&name, options),
            Entity::Topic(name, options) => broker.create_topic(&name, options),
            Entity::Subscription(topic, name, options) => {
                broker.create_subscription(&topic, &name, options)
            }
        };
        if let Err(error) = result {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    }
    println!("{}", broker.connection_string());
    eprintln!("listening on {}; Ctrl-C stops", broker.address());
    let _ = tokio::signal::ctrl_c().await;
    broker.shutdown().await;
    ExitCode::SUCCESS
}
