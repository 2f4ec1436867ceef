//! The v1beta REST wire format: request and response bodies as Gemini spells them
//! (camelCase JSON), shared by the client and the fake server.
//!
//! Only the fields the agent uses are modelled; unknown fields in responses are ignored so
//! that Google adding a field never breaks a call. Optional request fields are skipped when
//! unset so the request carries exactly what the caller chose and Gemini's defaults apply
//! to the rest.
//!
//! Enumerations Google extends over time ([`FinishReason`], [`BlockReason`]) keep values
//! this code does not know instead of failing to parse: a new finish reason must not turn a
//! good reply into a malformed one.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The body of `:generateContent`, `:streamGenerateContent` and (wrapped) `:countTokens`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentRequest {
    /// The conversation so far, oldest first, alternating `user` and `model` turns.
    pub contents: Vec<Content>,
    /// The system prompt; its content has no role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_instruction: Option<Content>,
    /// Sampling and length settings; `None` leaves Gemini's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_config: Option<GenerationConfig>,
    /// Safety thresholds per harm category; empty leaves Gemini's defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub safety_settings: Vec<SafetySetting>,
}

impl GenerateContentRequest {
    /// The text of the last `user` turn, which is what the model is asked to answer.
    pub fn last_user_text(&self) -> Option<String> {
        self.contents
            .iter()
            .rev()
            .find(|content| content.role == Some(Role::User))
            .map(Content::text)
    }
}

/// One turn of a conversation (or the system instruction).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    /// Who said it; absent on the system instruction and sometimes on response content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The pieces of the turn; a response's last chunk may have none.
    #[serde(default)]
    pub parts: Vec<Part>,
}

impl Content {
    /// A user turn with one text part.
    pub fn user(text: impl Into<String>) -> Self {
        Self::with_role(Some(Role::User), text)
    }

    /// A model turn with one text part (an earlier reply, sent back as history).
    pub fn model(text: impl Into<String>) -> Self {
        Self::with_role(Some(Role::Model), text)
    }

    /// A system instruction: one text part and no role, as Gemini expects.
    pub fn system(text: impl Into<String>) -> Self {
        Self::with_role(None, text)
    }

    fn with_role(role: Option<Role>, text: impl Into<String>) -> Self {
        Self {
            role,
            parts: vec![Part::text(text)],
        }
    }

    /// The reply text: every text part that is not a thought, concatenated.
    pub fn text(&self) -> String {
        self.parts
            .iter()
            .filter(|part| !part.thought)
            .filter_map(|part| part.text.as_deref())
            .collect()
    }
}

/// The author of a [`Content`]. Gemini says `model` where other APIs say `assistant`; an
/// enum keeps the wrong word from being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The person (or the application speaking for them).
    User,
    /// The model.
    Model,
    /// A role this code does not know, kept so a response still parses. Never sent: it
    /// would serialise as `"other"`.
    #[serde(other)]
    Other,
}

/// One piece of a [`Content`]. Only text parts are modelled; other kinds (inline data,
/// function calls) parse as parts without text and are ignored by the text helpers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Part {
    /// The text of this piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `true` when the text is the model's reasoning rather than its reply. Thoughts are
    /// only returned when `thinkingConfig.includeThoughts` asks for them and are never
    /// shown as the answer.
    #[serde(default, skip_serializing_if = "is_false")]
    pub thought: bool,
}

/// For `skip_serializing_if`, which passes a reference.
fn is_false(value: &bool) -> bool {
    !*value
}

impl Part {
    /// A reply (or prompt) text part.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: Some(text.into()),
            thought: false,
        }
    }

    /// A reasoning part, as a thinking model returns it.
    pub fn thought(text: impl Into<String>) -> Self {
        Self {
            text: Some(text.into()),
            thought: true,
        }
    }
}

/// Sampling and length settings. Every field is optional so that unset ones keep the
/// model's own defaults (which differ between models).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationConfig {
    /// Randomness, 0.0 to 2.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// The longest reply in tokens; reaching it ends the reply with `MAX_TOKENS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Top-k sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Sequences that end the reply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop_sequences: Vec<String>,
    /// How many candidates to generate; the agent uses the first only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_count: Option<u32>,
    /// A fixed seed, for repeatable sampling where the model supports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Reasoning settings of thinking models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking_config: Option<ThinkingConfig>,
}

/// Reasoning settings of thinking models (`generationConfig.thinkingConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThinkingConfig {
    /// Tokens the model may spend thinking; 0 turns thinking off where allowed, -1 lets
    /// the model decide. Thinking tokens are billed as output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking_budget: Option<i32>,
    /// Whether thought summaries come back as `thought: true` parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_thoughts: Option<bool>,
    /// The coarse setting of newer models (`low`, `high`), instead of a budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking_level: Option<String>,
}

/// A safety threshold for one harm category, as Gemini names them
/// (`HARM_CATEGORY_HARASSMENT`, `BLOCK_ONLY_HIGH`, ...). Kept as strings: the lists grow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SafetySetting {
    /// The harm category.
    pub category: String,
    /// The blocking threshold.
    pub threshold: String,
}

/// One response of `:generateContent`, or one chunk of `:streamGenerateContent`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentResponse {
    /// The generated candidates; empty when the prompt was blocked.
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    /// Token counts; running totals on stream chunks, final on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_metadata: Option<UsageMetadata>,
    /// Why the prompt was blocked, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_feedback: Option<PromptFeedback>,
    /// The exact model version that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// Gemini's id for this response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
}

impl GenerateContentResponse {
    /// The reply text of the first candidate without thought parts; empty if there is none.
    pub fn text(&self) -> String {
        self.candidates
            .first()
            .map(Candidate::text)
            .unwrap_or_default()
    }

    /// The first candidate's finish reason, present on the last chunk only.
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.candidates
            .first()
            .and_then(|candidate| candidate.finish_reason.as_ref())
    }

    /// Why the prompt was blocked, if Gemini refused it before generating anything.
    pub fn block_reason(&self) -> Option<&BlockReason> {
        self.prompt_feedback
            .as_ref()
            .and_then(|feedback| feedback.block_reason.as_ref())
    }
}

/// One generated answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    /// The generated turn (on a stream: only the new text of this chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// Why generation stopped; set on the last chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// The candidate's position when several were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// Gemini's explanation of the finish reason, when it gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_message: Option<String>,
}

impl Candidate {
    /// The reply text without thought parts.
    pub fn text(&self) -> String {
        self.content.as_ref().map(Content::text).unwrap_or_default()
    }
}

/// Token counts of a call. Every field defaults to 0 because Gemini omits zero counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageMetadata {
    /// Input tokens, including the system instruction and history.
    #[serde(default)]
    pub prompt_token_count: u64,
    /// Reply tokens so far.
    #[serde(default)]
    pub candidates_token_count: u64,
    /// Everything billed: prompt, reply and thoughts.
    #[serde(default)]
    pub total_token_count: u64,
    /// Reasoning tokens (billed as output, never shown).
    #[serde(default)]
    pub thoughts_token_count: u64,
    /// Input tokens served from a context cache.
    #[serde(default)]
    pub cached_content_token_count: u64,
}

/// Gemini's verdict on the prompt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromptFeedback {
    /// Set when the prompt was refused; then there are no candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_reason: Option<BlockReason>,
}

/// Defines a string enumeration of the wire format that keeps values it does not know.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this code does not know, kept as Gemini sent it.
            Unrecognized(String),
        }

        impl $name {
            /// The value as Gemini spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $wire, )+
                    Self::Unrecognized(other) => other,
                }
            }

            /// Reads a wire value; unknown values are kept, never rejected.
            pub fn parse(value: &str) -> Self {
                match value {
                    $( $wire => Self::$variant, )+
                    other => Self::Unrecognized(other.to_owned()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Ok(Self::parse(&value))
            }
        }
    };
}

wire_enum! {
    /// Why a candidate stopped (`candidates[].finishReason`).
    pub enum FinishReason {
        /// Unset; Gemini should not send it.
        Unspecified => "FINISH_REASON_UNSPECIFIED",
        /// The model finished its reply.
        Stop => "STOP",
        /// The reply reached `maxOutputTokens`: it is cut short.
        MaxTokens => "MAX_TOKENS",
        /// The reply was stopped by the safety filters.
        Safety => "SAFETY",
        /// The reply was stopped for reciting training data.
        Recitation => "RECITATION",
        /// The reply was stopped for a forbidden term.
        Blocklist => "BLOCKLIST",
        /// The reply was stopped for prohibited content.
        ProhibitedContent => "PROHIBITED_CONTENT",
        /// The reply was stopped for sensitive personal information.
        Spii => "SPII",
        /// The model produced an invalid function call.
        MalformedFunctionCall => "MALFORMED_FUNCTION_CALL",
        /// The reply was stopped for a reason Gemini does not name.
        Other => "OTHER",
    }
}

impl FinishReason {
    /// Whether the reply was stopped by a content filter rather than finishing. Such a stop
    /// is deterministic for the same prompt: retrying does not help and the key is not to
    /// blame.
    pub fn is_blocked(&self) -> bool {
        matches!(
            self,
            Self::Safety
                | Self::Recitation
                | Self::Blocklist
                | Self::ProhibitedContent
                | Self::Spii
        )
    }
}

wire_enum! {
    /// Why a prompt was refused (`promptFeedback.blockReason`).
    pub enum BlockReason {
        /// Unset; Gemini should not send it.
        Unspecified => "BLOCK_REASON_UNSPECIFIED",
        /// The safety filters refused the prompt.
        Safety => "SAFETY",
        /// Refused for a reason Gemini does not name.
        Other => "OTHER",
        /// The prompt contains a forbidden term.
        Blocklist => "BLOCKLIST",
        /// The prompt contains prohibited content.
        ProhibitedContent => "PROHIBITED_CONTENT",
        /// An image in the prompt was refused.
        ImageSafety => "IMAGE_SAFETY",
    }
}

/// The body of `:countTokens` in the form that accepts a whole request (with its system
/// instruction), so the count matches what `:generateContent` will bill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CountTokensRequest {
    /// The request to count, with its `model` set.
    pub generate_content_request: CountedRequest,
}

/// A [`GenerateContentRequest`] with the `model` field `:countTokens` requires inside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CountedRequest {
    /// `models/{model}`.
    pub model: String,
    /// The request itself.
    #[serde(flatten)]
    pub request: GenerateContentRequest,
}

/// The answer of `:countTokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CountTokensResponse {
    /// Input tokens the request would use.
    #[serde(default)]
    pub total_tokens: u64,
}

/// The answer of `GET /v1beta/models`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListModelsResponse {
    /// One page of models.
    #[serde(default)]
    pub models: Vec<ModelInfo>,
    /// Where the next page starts, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// A model as `GET /v1beta/models` describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    /// `models/{model}`.
    pub name: String,
    /// A human name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The largest prompt, in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_token_limit: Option<u64>,
    /// The longest reply, in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_token_limit: Option<u64>,
    /// The methods the model serves (`generateContent`, `countTokens`, ...).
    #[serde(default)]
    pub supported_generation_methods: Vec<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_request_serialises_in_camel_case_without_unset_fields() {
        let request = GenerateContentRequest {
            contents: vec![Content::user("hi"), Content::model("hello")],
            system_instruction: Some(Content::system("be brief")),
            generation_config: Some(GenerationConfig {
                temperature: Some(0.5),
                max_output_tokens: Some(64),
                thinking_config: Some(ThinkingConfig {
                    thinking_budget: Some(0),
                    ..ThinkingConfig::default()
                }),
                ..GenerationConfig::default()
            }),
            safety_settings: Vec::new(),
        };

        let value = serde_json::to_value(&request).unwrap();

        assert_eq!(
            value,
            json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "hi"}]},
                    {"role": "model", "parts": [{"text": "hello"}]},
                ],
                "systemInstruction": {"parts": [{"text": "be brief"}]},
                "generationConfig": {
                    "temperature": 0.5,
                    "maxOutputTokens": 64,
                    "thinkingConfig": {"thinkingBudget": 0},
                },
            })
        );
    }

    #[test]
    fn the_reply_text_leaves_out_thoughts() {
        let response: GenerateContentResponse = serde_json::from_value(json!({
            "candidates": [{
                "content": {"role": "model", "parts": [
                    {"text": "let me think", "thought": true},
                    {"text": "Hello"},
                    {"functionCall": {"name": "f"}},
                    {"text": ", world"},
                ]},
                "finishReason": "STOP",
            }],
            "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 9, "thoughtsTokenCount": 4},
        }))
        .unwrap();

        assert_eq!(response.text(), "Hello, world");
        assert_eq!(response.finish_reason(), Some(&FinishReason::Stop));
        let usage = response.usage_metadata.unwrap();
        assert_eq!(usage.prompt_token_count, 3);
        assert_eq!(usage.candidates_token_count, 0);
        assert_eq!(usage.thoughts_token_count, 4);
    }

    #[test]
    fn a_last_chunk_without_parts_parses() {
        let response: GenerateContentResponse = serde_json::from_value(json!({
            "candidates": [{"content": {"role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}],
        }))
        .unwrap();

        assert_eq!(response.text(), "");
        assert_eq!(response.finish_reason(), Some(&FinishReason::MaxTokens));
    }

    #[test]
    fn unknown_finish_reasons_are_kept() {
        let reason: FinishReason = serde_json::from_value(json!("IMAGE_OTHER")).unwrap();

        assert_eq!(reason, FinishReason::Unrecognized("IMAGE_OTHER".into()));
        assert_eq!(serde_json::to_value(&reason).unwrap(), json!("IMAGE_OTHER"));
        assert!(!reason.is_blocked());
    }

    #[test]
    fn only_content_filter_finish_reasons_count_as_blocked() {
        for (wire, blocked) in [
            ("STOP", false),
            ("MAX_TOKENS", false),
            ("SAFETY", true),
            ("RECITATION", true),
            ("BLOCKLIST", true),
            ("PROHIBITED_CONTENT", true),
            ("SPII", true),
            ("MALFORMED_FUNCTION_CALL", false),
            ("OTHER", false),
        ] {
            let reason = FinishReason::parse(wire);
            assert_eq!(reason.as_str(), wire);
            assert!(!matches!(reason, FinishReason::Unrecognized(_)), "{wire}");
            assert_eq!(reason.is_blocked(), blocked, "{wire}");
        }
    }

    #[test]
    fn a_blocked_prompt_has_a_block_reason_and_no_candidates() {
        let response: GenerateContentResponse = serde_json::from_value(json!({
            "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
            "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
        }))
        .unwrap();

        assert!(response.candidates.is_empty());
        assert_eq!(response.block_reason(), Some(&BlockReason::Safety));
    }

    #[test]
    fn unknown_roles_parse() {
        let content: Content =
            serde_json::from_value(json!({"role": "function", "parts": []})).unwrap();

        assert_eq!(content.role, Some(Role::Other));
    }

    #[test]
    fn count_tokens_wraps_the_request_with_its_model() {
        let request = CountTokensRequest {
            generate_content_request: CountedRequest {
                model: "models/gemini-2.5-flash".into(),
                request: GenerateContentRequest {
                    contents: vec![Content::user("hi")],
                    ..GenerateContentRequest::default()
                },
            },
        };

        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            json!({"generateContentRequest": {
                "model": "models/gemini-2.5-flash",
                "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            }})
        );
    }

    #[test]
    fn the_last_user_text_is_the_question() {
        let request = GenerateContentRequest {
            contents: vec![
                Content::user("first"),
                Content::model("answer"),
                Content::user("second"),
            ],
            ..GenerateContentRequest::default()
        };

        assert_eq!(request.last_user_text().as_deref(), Some("second"));
    }
}
