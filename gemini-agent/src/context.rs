//! What the agent sends: the conversation up to the message being answered, within a
//! token budget (api.md, "What the agent sends").
//!
//! The conversation's system prompt, followed by the run's instructions, becomes
//! `systemInstruction`; user messages become `user` turns and assistant replies
//! `model` turns, oldest first, deleted ones left out and edited ones in their latest
//! text, ending with the prompt. Messages written after the prompt are not part of
//! it. When the estimate exceeds the budget the oldest turns go first; the prompt is
//! never dropped.

use colloquy_domain::conversation::Author;
use colloquy_domain::{ConversationEvent, DomainEvent, MessageId};
use colloquy_eventstore::RecordedEvent;

use crate::gemini::{Content, GenerateContentRequest, GenerationConfig, Part, Role};

/// A rough token count for text: Gemini's tokenizer averages about four characters a
/// token for English; the estimate errs on the high side for other scripts, which is
/// the safe side for a budget.
pub fn estimate_tokens(text: &str) -> u64 {
    let chars = text.chars().count() as u64;
    chars.div_ceil(4) + 4
}

/// Why no request could be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// The prompt message is not in the conversation (or was deleted).
    #[error("the message to answer is not in the conversation")]
    PromptMissing,
    /// A stored event could not be decoded.
    #[error("a conversation event could not be decoded: {0}")]
    Decode(String),
}

/// The request for answering `prompt` in the conversation whose events (oldest first)
/// are `events`.
///
/// # Errors
/// [`ContextError`] when the prompt is missing or an event is unreadable.
pub fn build_request(
    events: &[RecordedEvent],
    prompt: MessageId,
    instructions: Option<&str>,
    generation: Option<GenerationConfig>,
    token_budget: u64,
) -> Result<GenerateContentRequest, ContextError> {
    let mut system_prompt: Option<String> = None;
    // Messages in conversation order: (id, author, text, deleted).
    let mut messages: Vec<(MessageId, Author, String, bool)> = Vec::new();
    for event in events {
        let decoded = ConversationEvent::from_stored(
            &event.event_type,
            event.schema_version(),
            event.data.clone(),
        );
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(error) if error.is_skippable() => continue,
            Err(error) => return Err(ContextError::Decode(error.to_string())),
        };
        match decoded {
            ConversationEvent::ConversationStarted(started) => {
                system_prompt = started.system_prompt;
            }
            ConversationEvent::MessageSent(sent) => {
                messages.push((sent.message_id, sent.author, sent.text, false));
            }
            ConversationEvent::MessageEdited(edited) => {
                if let Some(message) = messages.iter_mut().find(|m| m.0 == edited.message_id) {
                    message.2 = edited.text;
                }
            }
            ConversationEvent::MessageDeleted(deleted) => {
                if let Some(message) = messages.iter_mut().find(|m| m.0 == deleted.message_id) {
                    message.3 = true;
                }
            }
            _ => {}
        }
    }
    let end = messages
        .iter()
        .position(|m| m.0 == prompt && !m.3)
        .ok_or(ContextError::PromptMissing)?;
    let turns: Vec<(Role, String)> = messages[..=end]
        .iter()
        .filter(|m| !m.3 && !m.2.trim().is_empty())
        .filter_map(|(_, author, text, _)| match author {
            Author::User => Some((Role::User, text.clone())),
            Author::Assistant => Some((Role::Model, text.clone())),
            Author::System => None,
        })
        .collect();
    let system = [system_prompt.as_deref(), instructions]
        .into_iter()
        .flatten()
        .filter(|t| !t.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n\n");
    // Keep the newest turns that fit, always the prompt.
    let mut spent = if system.is_empty() {
        0
    } else {
        estimate_tokens(&system)
    };
    let mut kept = 0;
    for (index, (_, text)) in turns.iter().enumerate().rev() {
        let cost = estimate_tokens(text);
        if index + 1 < turns.len() && spent + cost > token_budget {
            break;
        }
        spent += cost;
        kept += 1;
    }
    let mut contents: Vec<Content> = Vec::new();
    let dropped = turns.len() - kept;
    for (role, text) in turns.into_iter().skip(dropped) {
        match contents.last_mut() {
            // Gemini wants turns to alternate: consecutive messages of one role join.
            Some(last) if last.role == Some(role) => last.parts.push(Part::text(text)),
            _ => contents.push(Content {
                role: Some(role),
                parts: vec![Part::text(text)],
            }),
        }
    }
    Ok(GenerateContentRequest {
        contents,
        system_instruction: (!system.is_empty()).then(|| Content::system(system)),
        generation_config: generation,
        ..GenerateContentRequest::default()
    })
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::{Value, json};
    use uuid::Uuid;

    use super::*;

    fn event(event_type: &str, data: Value) -> RecordedEvent {
        RecordedEvent {
            global_position: 1,
            position: 0,
            time: Utc::now(),
            stream_name: "conversation-x".into(),
            event_type: event_type.into(),
            data,
            metadata: Some(
                json!({ "schemaVersion": if event_type == "MessageSent" { 2 } else { 1 } }),
            ),
            id: Uuid::new_v4(),
        }
    }

    fn started(system_prompt: Option<&str>) -> RecordedEvent {
        let mut data = json!({ "conversationId": Uuid::new_v4(), "owner": Uuid::new_v4() });
        if let Some(prompt) = system_prompt {
            data["systemPrompt"] = json!(prompt);
        }
        event("ConversationStarted", data)
    }

    fn sent(id: Uuid, author: &str, text: &str) -> RecordedEvent {
        event(
            "MessageSent",
            json!({ "messageId": id, "author": author, "text": text }),
        )
    }

    fn texts(request: &GenerateContentRequest) -> Vec<(Option<Role>, String)> {
        request
            .contents
            .iter()
            .map(|c| (c.role, c.text()))
            .collect()
    }

    #[test]
    fn turns_alternate_with_model_roles_and_end_at_the_prompt() {
        let (a, b, c, d) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let events = vec![
            started(Some("Be brief.")),
            sent(a, "user", "first"),
            sent(b, "assistant", "reply"),
            sent(c, "user", "second"),
            sent(d, "user", "after the prompt"),
        ];
        let request = build_request(
            &events,
            MessageId::from_uuid(c),
            Some("Answer in French."),
            None,
            10_000,
        )
        .unwrap();
        assert_eq!(
            texts(&request),
            [
                (Some(Role::User), "first".to_owned()),
                (Some(Role::Model), "reply".to_owned()),
                (Some(Role::User), "second".to_owned()),
            ]
        );
        let system = request.system_instruction.unwrap();
        assert_eq!(system.role, None);
        assert_eq!(system.text(), "Be brief.\n\nAnswer in French.");
    }

    #[test]
    fn deleted_messages_are_left_out_and_edits_show_their_latest_text() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let events = vec![
            started(None),
            sent(a, "user", "gone"),
            sent(b, "user", "draft"),
            event("MessageDeleted", json!({ "messageId": a })),
            sent(c, "user", "prompt"),
            event("MessageEdited", json!({ "messageId": b, "text": "final" })),
        ];
        let request = build_request(&events, MessageId::from_uuid(c), None, None, 10_000).unwrap();
        assert!(request.system_instruction.is_none());
        // Two user messages in a row join into one turn.
        assert_eq!(request.contents.len(), 1);
        assert_eq!(request.contents[0].parts.len(), 2);
        assert_eq!(request.contents[0].text(), "finalprompt");
        let deleted_prompt = vec![
            started(None),
            sent(c, "user", "prompt"),
            event("MessageDeleted", json!({ "messageId": c })),
        ];
        assert_eq!(
            build_request(&deleted_prompt, MessageId::from_uuid(c), None, None, 10).unwrap_err(),
            ContextError::PromptMissing
        );
    }

    #[test]
    fn the_oldest_turns_go_first_and_the_prompt_always_stays() {
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        let long = "x".repeat(400); // about 104 tokens
        let mut events = vec![started(None)];
        for (i, id) in ids.iter().enumerate() {
            let author = if i % 2 == 0 { "user" } else { "assistant" };
            events.push(sent(*id, author, &format!("{i}{long}")));
        }
        let prompt = MessageId::from_uuid(ids[3]);
        let request = build_request(&events, prompt, None, None, 250).unwrap();
        let kept: Vec<char> = request
            .contents
            .iter()
            .map(|c| c.text().chars().next().unwrap())
            .collect();
        assert_eq!(kept, ['2', '3'], "the newest two fit in 250 tokens");
        // A prompt larger than the whole budget is still sent, alone.
        let request = build_request(&events, prompt, None, None, 1).unwrap();
        assert_eq!(request.contents.len(), 1);
        assert!(request.contents[0].text().starts_with('3'));
    }
}
