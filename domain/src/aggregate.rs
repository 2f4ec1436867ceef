//! The shape every aggregate shares: `decide` and `evolve`.

use crate::error::DomainError;
use crate::event::DomainEvent;

/// An event-sourced aggregate: a pure decision function over a small state
/// folded from its stream.
///
/// The state is `Option<Self>`: `None` means the stream is empty (the
/// aggregate does not exist yet). A creation command decides on `None`; every
/// other command on `None` is [`DomainError::NotFound`].
///
/// The caller loads the stream, folds it with [`Aggregate::fold`], calls
/// [`Aggregate::decide`] and appends the returned events with the stream
/// version it loaded as the expected version. An empty `Vec` means "accepted,
/// nothing to record" (an idempotent repeat): append nothing.
pub trait Aggregate: Sized + Clone {
    /// What callers ask for.
    type Command;
    /// What happened (past tense); the stream's contents.
    type Event: DomainEvent;
    /// The Message DB category of this aggregate's streams.
    const CATEGORY: &'static str;

    /// Decides what happens when `command` meets `state`. Pure: no I/O, no
    /// clock, no id generation.
    ///
    /// # Errors
    /// The command breaks a rule; nothing should be appended.
    fn decide(
        state: Option<&Self>,
        command: Self::Command,
    ) -> Result<Vec<Self::Event>, DomainError>;

    /// Applies one recorded event. Total: events are facts, so this never
    /// fails; an event that cannot apply (which `decide` never produces, e.g. a
    /// second creation event) leaves the state unchanged.
    #[must_use]
    fn evolve(state: Option<Self>, event: &Self::Event) -> Option<Self>;

    /// Folds a whole stream, oldest first.
    #[must_use]
    fn fold<'a, I>(events: I) -> Option<Self>
    where
        I: IntoIterator<Item = &'a Self::Event>,
        Self::Event: 'a,
    {
        events.into_iter().fold(None, Self::evolve)
    }
}

/// Links an event type to the aggregate whose stream holds it (used by the
/// test harness to infer the aggregate from `given([...])`).
pub trait AggregateEvent: DomainEvent {
    /// The aggregate that records this event.
    type Aggregate: Aggregate<Event = Self>;
}
