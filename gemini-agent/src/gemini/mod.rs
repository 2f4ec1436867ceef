//! Gemini's v1beta REST API as the agent uses it.
//!
//! - [`wire`]: the request and response bodies.
//! - [`sse`]: the event-stream decoder under streamed replies.
//! - [`error`]: Gemini's error envelope and [`CallFailure`], what a failure means for
//!   retries and for the key pool.
//! - [`client`]: [`GeminiClient`], the HTTP calls.
//!
//! The fake server that speaks the same format for tests is [`crate::fake`].

pub mod client;
pub mod error;
pub mod sse;
pub mod wire;

pub use client::{
    ClientBuildError, DEFAULT_BASE_URL, GeminiClient, GeminiConfig, Reply, ReplyStream, StreamEvent,
};
pub use error::{
    ApiError, BlockedBy, CallFailure, ErrorDetail, KeyEffect, QuotaScope, QuotaViolation,
    RetryTimeouts, TransportKind,
};
pub use wire::{
    BlockReason, Candidate, Content, FinishReason, GenerateContentRequest, GenerateContentResponse,
    GenerationConfig, Part, PromptFeedback, Role, ThinkingConfig, UsageMetadata,
};
