//! Position waits (architecture rule 5): a read model has reached P when its
//! checkpoint is at or above P. Every projection applies every event (skipping those
//! that do not concern it), so a wait for any P completes on every read model.

use std::time::Duration;

use colloquy_eventstore::{Database, GlobalPosition};

use crate::runner::read_checkpoint;

/// Waits until the projection whose tables live in `schema` has reached `position`,
/// for at most `timeout`. Returns whether it did.
pub async fn wait_for_position(
    db: &Database,
    schema: &str,
    position: GlobalPosition,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if read_checkpoint(db, schema).await? >= position {
            return Ok(true);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
