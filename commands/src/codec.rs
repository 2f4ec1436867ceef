//! Domain events to stored events and back. The schema version travels in the
//! metadata (`schemaVersion`); events written without one (e.g. by a Message DB
//! client) are read as version 1.

use colloquy_domain::DomainEvent;
use colloquy_domain::event::DecodeError;
use colloquy_eventstore::{NewEvent, RecordedEvent};

use crate::context::Context;

/// Encodes the `index`-th event of a command.
pub fn encode<E: DomainEvent>(event: &E, ctx: &Context, index: usize) -> NewEvent {
    NewEvent::new(ctx.event_id(index), event.event_type(), event.to_data())
        .with_metadata(ctx.metadata(event.schema_version()))
}

/// Decodes (and upcasts) a stored event. `Ok(None)` for a type this build does not
/// know, which readers skip.
pub fn decode<E: DomainEvent>(event: &RecordedEvent) -> Result<Option<E>, DecodeError> {
    match E::from_stored(
        &event.event_type,
        event.schema_version(),
        event.data.clone(),
    ) {
        Ok(e) => Ok(Some(e)),
        Err(e) if e.is_skippable() => Ok(None),
        Err(e) => Err(e),
    }
}
