//! Address normalization: the client writes the same entity as `amqp://host/Orders`,
//! `/orders` or `orders`, and the dead-letter sub-queue with any case of `$DeadLetterQueue`.

/// The node a link attaches to, after normalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    /// The claims-based-security node `$cbs`.
    Cbs,
    /// The management node of an entity (`<entity>/$management`), with the entity's key.
    Management(String),
    /// An entity: queue, topic, subscription or dead-letter sub-queue, by key.
    Entity(String),
}

/// The sub-queue suffix of dead-letter queues, in normalized (lower) case.
pub(crate) const DEAD_LETTER_SUFFIX: &str = "/$deadletterqueue";
const MANAGEMENT_SUFFIX: &str = "/$management";

/// Normalizes an entity path or address into the key the broker stores it under:
/// scheme and host removed, no leading or trailing `/`, lower case (Service Bus entity names
/// are case-insensitive).
pub(crate) fn entity_key(address: &str) -> String {
    let mut rest = address.trim();
    if let Some(pos) = rest.find("://") {
        rest = &rest[pos + 3..];
        rest = match rest.find('/') {
            Some(slash) => &rest[slash..],
            None => "",
        };
    }
    rest.trim_matches('/').to_ascii_lowercase()
}

/// Classifies an attach address.
pub(crate) fn node(address: &str) -> Node {
    let key = entity_key(address);
    if key == "$cbs" {
        Node::Cbs
    } else if let Some(entity) = key.strip_suffix(MANAGEMENT_SUFFIX) {
        Node::Management(entity.to_owned())
    } else {
        Node::Entity(key)
    }
}

/// The key of a subscription's store.
pub(crate) fn subscription_key(topic: &str, subscription: &str) -> String {
    format!(
        "{}/subscriptions/{}",
        entity_key(topic),
        entity_key(subscription)
    )
}

/// The key of the dead-letter sub-queue of an entity key.
pub(crate) fn dead_letter_key(entity: &str) -> String {
    format!("{entity}{DEAD_LETTER_SUFFIX}")
}

/// Checks that a queue, topic or subscription name is usable as one path segment.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('/')
        && !name.contains('$')
        && !name.contains(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_urls_bare_paths_and_case_normalize_to_the_same_key() {
        assert_eq!(entity_key("amqp://127.0.0.2/Orders"), "orders");
        assert_eq!(entity_key("sb://host:5672/orders/"), "orders");
        assert_eq!(entity_key("/orders"), "orders");
        assert_eq!(
            entity_key("amqp://h/Orders/$DeadLetterQueue"),
            "orders/$deadletterqueue"
        );
    }

    #[test]
    fn cbs_and_management_nodes_are_recognized() {
        assert_eq!(node("$cbs"), Node::Cbs);
        assert_eq!(
            node("t/Subscriptions/s/$management"),
            Node::Management("t/subscriptions/s".into())
        );
        assert_eq!(node("amqp://h/q"), Node::Entity("q".into()));
    }
}
