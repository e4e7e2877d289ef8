//! Creating queues, topics and subscriptions, and refusing sends on demand: the configuration a
//! test sets up, checked when it is given.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::address::{dead_letter_key, entity_key, subscription_key, valid_name};
use crate::error::Error;
use crate::options::{QueueOptions, SubscriptionOptions, TopicOptions};

use super::store::{Entity, EntityKind, State, Store, Subscription};

impl State {
    fn check_new_name(&self, name: &str, what: &str) -> Result<String, Error> {
        if !valid_name(name) {
            return Err(Error::InvalidConfiguration(format!(
                "{what} name `{name}` must be non-empty and contain no `/`, `$` or whitespace"
            )));
        }
        let key = entity_key(name);
        if self.entities.contains_key(&key) {
            return Err(Error::EntityExists(name.to_owned()));
        }
        Ok(key)
    }

    fn check_max_delivery_count(count: u32) -> Result<(), Error> {
        if count == 0 {
            return Err(Error::InvalidConfiguration(
                "max_delivery_count must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }

    fn check_lock_duration(duration: Duration) -> Result<(), Error> {
        if duration.is_zero() {
            return Err(Error::InvalidConfiguration(
                "lock_duration must be greater than zero".to_owned(),
            ));
        }
        Ok(())
    }

    pub(crate) fn create_queue(&mut self, name: &str, options: &QueueOptions) -> Result<(), Error> {
        let key = self.check_new_name(name, "queue")?;
        Self::check_max_delivery_count(options.max_delivery_count)?;
        Self::check_lock_duration(options.lock_duration)?;
        let dlq = dead_letter_key(&key);
        let mut store = Store::new(
            options.lock_duration,
            Some(options.max_delivery_count),
            Some(dlq.clone()),
        );
        store.default_time_to_live = options.default_message_time_to_live;
        store.dead_letter_on_expiration = options.dead_lettering_on_message_expiration;
        self.stores.insert(key.clone(), store);
        self.stores
            .insert(dlq, Store::new(options.lock_duration, None, None));
        self.entities.insert(
            key,
            Entity::new(
                EntityKind::Queue,
                (options.max_message_size, options.max_header_size),
                options.duplicate_detection_window,
            ),
        );
        Ok(())
    }

    pub(crate) fn create_topic(&mut self, name: &str, options: &TopicOptions) -> Result<(), Error> {
        let key = self.check_new_name(name, "topic")?;
        self.entities.insert(
            key,
            Entity::new(
                EntityKind::Topic {
                    subscriptions: BTreeMap::new(),
                },
                (options.max_message_size, options.max_header_size),
                options.duplicate_detection_window,
            ),
        );
        Ok(())
    }

    pub(crate) fn create_subscription(
        &mut self,
        topic: &str,
        name: &str,
        options: &SubscriptionOptions,
    ) -> Result<(), Error> {
        if !valid_name(name) {
            return Err(Error::InvalidConfiguration(format!(
                "subscription name `{name}` must be non-empty and contain no `/`, `$` or whitespace"
            )));
        }
        Self::check_max_delivery_count(options.max_delivery_count)?;
        Self::check_lock_duration(options.lock_duration)?;
        let forward_to = match &options.forward_to {
            Some(queue) => {
                let queue_key = entity_key(queue);
                match self.entities.get(&queue_key).map(|e| &e.kind) {
                    Some(EntityKind::Queue) => Some(queue_key),
                    _ => {
                        return Err(Error::InvalidConfiguration(format!(
                            "forward_to: queue `{queue}` does not exist"
                        )));
                    }
                }
            }
            None => None,
        };
        let topic_key = entity_key(topic);
        let sub_name = entity_key(name);
        let store_key = subscription_key(topic, name);
        let Some(Entity {
            kind: EntityKind::Topic { subscriptions },
            ..
        }) = self.entities.get_mut(&topic_key)
        else {
            return Err(Error::EntityNotFound(topic.to_owned()));
        };
        if subscriptions.contains_key(&sub_name) {
            return Err(Error::EntityExists(format!("{topic}/Subscriptions/{name}")));
        }
        subscriptions.insert(
            sub_name,
            Subscription {
                subject_filter: options.subject_filter.clone(),
                forward_to,
            },
        );
        let dlq = dead_letter_key(&store_key);
        let mut store = Store::new(
            options.lock_duration,
            Some(options.max_delivery_count),
            Some(dlq.clone()),
        );
        store.default_time_to_live = options.default_message_time_to_live;
        store.dead_letter_on_expiration = options.dead_lettering_on_message_expiration;
        self.stores.insert(store_key, store);
        self.stores
            .insert(dlq, Store::new(options.lock_duration, None, None));
        Ok(())
    }

    pub(crate) fn set_reject_sends(
        &mut self,
        entity: &str,
        reason: Option<String>,
    ) -> Result<(), Error> {
        let entity_state = self
            .entities
            .get_mut(&entity_key(entity))
            .ok_or_else(|| Error::EntityNotFound(entity.to_owned()))?;
        entity_state.reject_sends = reason;
        Ok(())
    }
}
