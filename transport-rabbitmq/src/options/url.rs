//! Reading the broker URL with lapin's parser, after checking the numeric query parameters it
//! reads (so that a wrong one is named), and without ever echoing the password.

use lapin::uri::{AMQPScheme, AMQPUri};
use redeliver_core::Error;
use redeliver_core::secret::SecretUrl;

/// `url` parsed, as lapin connects to it: `amqp://` or `amqps://`.
pub(super) fn parse(url: &SecretUrl) -> Result<AMQPUri, Error> {
    if !url.expose().contains("://") {
        // Not echoed: without `//` nothing marks where a password would be.
        return Err(Error::config(
            "url",
            "must start with `amqp://` or `amqps://`",
        ));
    }
    let shown = url.redacted();
    check_query(url.expose(), &shown)?;
    let uri: AMQPUri = url.expose().parse().map_err(|e: String| {
        // The parser's message may quote the URL as given, password and all.
        let e = e.replace(url.expose(), &shown);
        Error::config("url", format!("`{shown}` is not an AMQP URL: {e}"))
    })?;
    match uri.scheme {
        AMQPScheme::AMQP | AMQPScheme::AMQPS => Ok(uri),
    }
}

/// Checks the numeric query parameters lapin reads from the URL, naming the one that is wrong
/// (lapin's own message only says "invalid digit found in string").
fn check_query(url: &str, shown: &str) -> Result<(), Error> {
    const NUMERIC: [(&str, &str); 4] = [
        ("heartbeat", "seconds, 0 to 65535"),
        ("frame_max", "bytes, 0 to 4294967295"),
        ("channel_max", "channels, 0 to 65535"),
        ("connection_timeout", "milliseconds"),
    ];
    let Some((_, query)) = url.split_once('?') else {
        return Ok(());
    };
    let query = query.split('#').next().unwrap_or("");
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some((_, unit)) = NUMERIC.iter().find(|(name, _)| *name == key) else {
            continue;
        };
        let ok = match key {
            "heartbeat" | "channel_max" => value.parse::<u16>().is_ok(),
            "frame_max" => value.parse::<u32>().is_ok(),
            _ => value.parse::<u64>().is_ok(),
        };
        if !ok {
            return Err(Error::config(
                format!("url.{key}"),
                format!(
                    "the query parameter `{key}` of `{shown}` is `{value}`, not a number ({unit})"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use redeliver_core::Error;

    use crate::RabbitMqOptions;

    #[test]
    fn passwords_never_appear_in_messages() {
        let options = RabbitMqOptions::new("amqps://app:s3cret@mq.example:5671/prod");
        assert_eq!(
            options.redacted_url(),
            "amqps://app:***@mq.example:5671/prod"
        );
        let shown = format!("{options:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("app:***@mq.example"), "{shown}");
        for url in [
            "amqp://u:pw-secret@[bad",
            "amqp:u:pw-secret@host",
            "amqp://u:pw-secret@host/%2f?heartbeat=abc",
        ] {
            let e = RabbitMqOptions::new(url).validate().unwrap_err();
            assert!(!e.to_string().contains("pw-secret"), "{e}");
            assert!(!format!("{e:?}").contains("pw-secret"), "{e:?}");
        }
    }

    #[test]
    fn a_bad_query_parameter_is_named() {
        let e = RabbitMqOptions::new("amqp://guest:guest@localhost/%2f?heartbeat=abc")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("`heartbeat`"), "{e}");
        assert!(e.to_string().contains("`abc`"), "{e}");
        assert!(
            matches!(&e, Error::Config { field, .. } if field == "url.heartbeat"),
            "{e:?}"
        );
        RabbitMqOptions::new("amqp://guest:guest@localhost/%2f?heartbeat=30&frame_max=131072")
            .validate()
            .unwrap();
    }
}
