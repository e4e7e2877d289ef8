//! Reading the broker URL with lapin's parser, after checking the numeric query parameters it
//! reads (so that a wrong one is named), and without ever echoing the password.
//!
//! A cluster is one URL with the nodes' addresses separated by commas:
//! `amqp://user:password@host1:5672,host2:5672,host3:5672/vhost`. Every node shares the
//! scheme, the credentials, the virtual host and the query parameters.

use lapin::uri::{AMQPScheme, AMQPUri};
use redeliver_core::Error;
use redeliver_core::secret::SecretUrl;

/// Every node of `url`, as lapin connects to it, in the order given: `amqp://` or `amqps://`.
pub(super) fn parse(url: &SecretUrl) -> Result<Vec<AMQPUri>, Error> {
    if !url.expose().contains("://") {
        // Not echoed: without `//` nothing marks where a password would be.
        return Err(Error::config(
            "url",
            "must start with `amqp://` or `amqps://`",
        ));
    }
    let shown = url.redacted();
    check_query(url.expose(), &shown)?;
    let nodes = node_urls(url.expose());
    let count = nodes.len();
    nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            if node.host_is_empty {
                return Err(Error::config(
                    "url",
                    format!(
                        "`{shown}` names {count} nodes and node {} of them has no address",
                        index + 1
                    ),
                ));
            }
            let uri: AMQPUri = node.url.parse().map_err(|e: String| {
                // The parser's message may quote the URL as given, password and all.
                let e = e
                    .replace(
                        node.url.as_str(),
                        &SecretUrl::new(node.url.as_str()).redacted(),
                    )
                    .replace(url.expose(), &shown);
                let which = if count > 1 {
                    format!(" (node {} of {count})", index + 1)
                } else {
                    String::new()
                };
                Error::config("url", format!("`{shown}` is not an AMQP URL{which}: {e}"))
            })?;
            match uri.scheme {
                AMQPScheme::AMQP | AMQPScheme::AMQPS => Ok(uri),
            }
        })
        .collect()
}

/// One node's URL, cut out of a URL that may name several.
struct NodeUrl {
    url: String,
    host_is_empty: bool,
}

/// `url` once per address in its comma-separated host list (once if it has no list).
fn node_urls(url: &str) -> Vec<NodeUrl> {
    let whole = || {
        vec![NodeUrl {
            url: url.to_owned(),
            host_is_empty: false,
        }]
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return whole();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    if !hosts.contains(',') {
        return whole();
    }
    hosts
        .split(',')
        .map(|host| NodeUrl {
            url: format!("{scheme}://{userinfo}{}{tail}", host.trim()),
            host_is_empty: host.trim().is_empty(),
        })
        .collect()
}

/// `host:port` of a node, for logs (no credentials).
pub(crate) fn node_address(uri: &AMQPUri) -> String {
    format!("{}:{}", uri.authority.host, uri.authority.port)
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
    fn a_url_may_name_several_nodes() {
        let options = RabbitMqOptions::new("amqp://app:s3cret@h1:5672,h2:5673, h3/%2f?heartbeat=5");
        let nodes = options.parsed_nodes().unwrap();
        let shown: Vec<_> = nodes.iter().map(super::node_address).collect();
        assert_eq!(shown, ["h1:5672", "h2:5673", "h3:5672"]);
        for node in &nodes {
            assert_eq!(node.authority.userinfo.username, "app");
            assert_eq!(node.authority.userinfo.password, "s3cret");
            assert_eq!(node.vhost, "/");
            assert_eq!(node.query.heartbeat, Some(5));
        }
        let single = RabbitMqOptions::new("amqps://app:pw@mq.example/prod")
            .parsed_nodes()
            .unwrap();
        assert_eq!(single.len(), 1);
        assert_eq!(super::node_address(&single[0]), "mq.example:5671");
        // The password is hidden in the URL shown, whatever the URL crate makes of the list.
        assert_eq!(
            options.redacted_url(),
            "amqp://***@h1:5672,h2:5673, h3/%2f?heartbeat=5"
        );
        assert!(!format!("{options:?}").contains("s3cret"));
    }

    #[test]
    fn a_bad_node_in_the_list_is_named_without_the_password() {
        let e = RabbitMqOptions::new("amqp://app:s3cret@h1:5672,,h3/%2f")
            .validate()
            .unwrap_err();
        assert!(
            e.to_string().contains("node 2 of them has no address"),
            "{e}"
        );
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = RabbitMqOptions::new("amqp://app:s3cret@h1:5672,h2:port/%2f")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("(node 2 of 2)"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(!format!("{e:?}").contains("s3cret"), "{e:?}");
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
