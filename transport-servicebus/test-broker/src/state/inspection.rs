//! What a test looks at: message counts and the dead letters of an entity.

use crate::address::{dead_letter_key, entity_key};
use crate::dead_letter::DeadLetter;
use crate::error::Error;

use super::message::{
    DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON, body_bytes, message_id_key, string_property,
    subject,
};
use super::store::{MsgState, State, Store};

impl State {
    fn store(&self, path: &str) -> Result<&Store, Error> {
        self.stores
            .get(&entity_key(path))
            .ok_or_else(|| Error::EntityNotFound(path.to_owned()))
    }

    pub(crate) fn active_count(&self, path: &str) -> Result<usize, Error> {
        Ok(self
            .store(path)?
            .messages
            .values()
            .filter(|m| m.state != MsgState::Deferred)
            .count())
    }

    pub(crate) fn deferred_count(&self, path: &str) -> Result<usize, Error> {
        Ok(self
            .store(path)?
            .messages
            .values()
            .filter(|m| m.state == MsgState::Deferred)
            .count())
    }

    pub(crate) fn scheduled_count(&self, entity: &str) -> Result<usize, Error> {
        self.entities
            .get(&entity_key(entity))
            .map(|e| e.scheduled.len())
            .ok_or_else(|| Error::EntityNotFound(entity.to_owned()))
    }

    pub(crate) fn dead_letters(&self, path: &str) -> Result<Vec<DeadLetter>, Error> {
        let key = dead_letter_key(&entity_key(path));
        let store = self
            .stores
            .get(&key)
            .ok_or_else(|| Error::EntityNotFound(path.to_owned()))?;
        Ok(store
            .messages
            .iter()
            .map(|(sequence_number, stored)| DeadLetter {
                sequence_number: *sequence_number,
                message_id: message_id_key(&stored.message),
                subject: subject(&stored.message).map(str::to_owned),
                body: body_bytes(&stored.message),
                reason: string_property(&stored.message, DEAD_LETTER_REASON),
                description: string_property(&stored.message, DEAD_LETTER_DESCRIPTION),
                delivery_count: stored.delivery_count,
            })
            .collect())
    }
}
