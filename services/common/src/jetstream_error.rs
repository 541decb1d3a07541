//! JetStream errors that keep what went wrong: a [`JetStreamErrorKind`] callers decide on,
//! and the async-nats error it came from (its text and its sources) for people to read.
//!
//! The kind comes from the async-nats error kinds and from the JetStream API error code a
//! server response carries (`async_nats::jetstream::ErrorCode`), never from the text.

use std::error::Error as StdError;
use std::fmt;

use async_nats::jetstream::{self, ErrorCode};

use JetStreamErrorKind as J;

/// Implements [`ClassifyKind`] for an async-nats kind enum: `Variant => kind` arms, the rest
/// `None`.
macro_rules! classify {
    ($kind:ty { $($pat:pat => $to:expr),* $(,)? }) => {
        impl ClassifyKind for $kind {
            #[allow(unreachable_patterns, clippy::match_single_binding)]
            fn classify(&self) -> Option<JetStreamErrorKind> {
                match self {
                    $($pat => $to,)*
                    _ => None,
                }
            }
        }
    };
}

/// Every kind with a [`ClassifyKind`] impl, for `classify_dyn`.
macro_rules! all_kinds {
    ($then:ident) => {
        $then!(
            async_nats::client::PublishErrorKind,
            async_nats::client::SubscribeErrorKind,
            async_nats::client::RequestErrorKind,
            async_nats::client::FlushErrorKind,
            async_nats::jetstream::context::PublishErrorKind,
            async_nats::jetstream::context::RequestErrorKind,
            async_nats::jetstream::context::ConsumerInfoErrorKind,
            async_nats::jetstream::context::CreateStreamErrorKind,
            async_nats::jetstream::context::GetStreamErrorKind,
            async_nats::jetstream::context::KeyValueErrorKind,
            async_nats::jetstream::context::CreateKeyValueErrorKind,
            async_nats::jetstream::context::ObjectStoreErrorKind,
            async_nats::jetstream::stream::DirectGetErrorKind,
            async_nats::jetstream::stream::LastRawMessageErrorKind,
            async_nats::jetstream::stream::ConsumerErrorKind,
            async_nats::jetstream::stream::ConsumerCreateStrictErrorKind,
            async_nats::jetstream::stream::ConsumerUpdateErrorKind,
            async_nats::jetstream::consumer::StreamErrorKind,
            async_nats::jetstream::consumer::pull::MessagesErrorKind,
            async_nats::jetstream::consumer::pull::OrderedErrorKind,
            async_nats::jetstream::consumer::pull::BatchErrorKind,
            async_nats::jetstream::kv::CreateErrorKind,
            async_nats::jetstream::kv::PutErrorKind,
            async_nats::jetstream::kv::EntryErrorKind,
            async_nats::jetstream::kv::WatchErrorKind,
            async_nats::jetstream::kv::WatcherErrorKind,
            async_nats::jetstream::kv::UpdateErrorKind,
            async_nats::jetstream::stream::PurgeErrorKind,
            async_nats::jetstream::stream::DeleteMessageErrorKind,
            async_nats::jetstream::object_store::InfoErrorKind,
            async_nats::jetstream::object_store::GetErrorKind,
            async_nats::jetstream::object_store::PutErrorKind,
            async_nats::jetstream::object_store::DeleteErrorKind,
        )
    };
}

/// What a JetStream operation ran into, as far as a caller decides on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JetStreamErrorKind {
    /// Nothing more can be stored: the stream is at a limit it discards new messages at
    /// (`DiscardPolicy::New`: maximum messages or bytes exceeded), or the account or server
    /// has no storage left.
    StreamFull,
    /// Nobody answered the request: JetStream is not enabled, or (for a publish) no stream
    /// holds the subject.
    NoResponders,
    /// No answer in time.
    TimedOut,
    /// The stream, consumer, key, object or message does not exist.
    NotFound,
    /// The subject's last sequence is not the one the publish expected
    /// (`Nats-Expected-Last-Subject-Sequence`, see [`crate::nats::publish_once`]).
    WrongLastSequence,
    /// What was to be created (a key, a consumer, a stream) exists already.
    AlreadyExists,
    /// Anything else (see the error's source).
    Other,
}

impl fmt::Display for JetStreamErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JetStreamErrorKind::StreamFull => "stream full",
            JetStreamErrorKind::NoResponders => "no responders",
            JetStreamErrorKind::TimedOut => "timed out",
            JetStreamErrorKind::NotFound => "not found",
            JetStreamErrorKind::WrongLastSequence => "wrong last sequence",
            JetStreamErrorKind::AlreadyExists => "already exists",
            JetStreamErrorKind::Other => "other",
        })
    }
}

/// A JetStream operation's error: its [`kind`](JetStreamError::kind) and the error it came
/// from. It reads as that error (its text, then that error's sources).
#[derive(Debug)]
pub struct JetStreamError {
    kind: JetStreamErrorKind,
    source: Box<dyn StdError + Send + Sync + 'static>,
}

impl JetStreamError {
    /// An error of `kind`, caused by `source`.
    pub fn new(kind: JetStreamErrorKind, source: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        JetStreamError { kind, source: source.into() }
    }

    /// An [`Other`](JetStreamErrorKind::Other) error that says `message`.
    pub fn other(message: impl Into<String>) -> Self {
        JetStreamError::new(JetStreamErrorKind::Other, message.into())
    }

    pub fn kind(&self) -> JetStreamErrorKind {
        self.kind
    }

    /// The error this one came from (an async-nats error, mostly), to downcast.
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        self.source.as_ref()
    }
}

impl fmt::Display for JetStreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

/// Transparent: its source is that of the error it wraps (whose text it already shows).
impl StdError for JetStreamError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.source()
    }
}

/// The kind a JetStream API error code means, where it means one of ours.
pub fn kind_of_code(code: ErrorCode) -> Option<JetStreamErrorKind> {
    use JetStreamErrorKind::*;
    Some(match code {
        // A publish the stream's limits refuse (`DiscardPolicy::New`) is answered with
        // 10077, "maximum messages exceeded", "maximum bytes exceeded" or "maximum messages
        // per subject exceeded"; the other store failures under it are as final for the
        // publisher. 10047 and 10028: the account or server has no storage left.
        ErrorCode::STREAM_STORE_FAILED
        | ErrorCode::STORAGE_RESOURCES_EXCEEDED
        | ErrorCode::MEMORY_RESOURCES_EXCEEDED => StreamFull,
        ErrorCode::STREAM_WRONG_LAST_SEQUENCE | ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT => WrongLastSequence,
        ErrorCode::STREAM_NOT_FOUND
        | ErrorCode::CONSUMER_NOT_FOUND
        | ErrorCode::CONSUMER_DOES_NOT_EXIST
        | ErrorCode::NO_MESSAGE_FOUND => NotFound,
        ErrorCode::STREAM_NAME_EXIST | ErrorCode::CONSUMER_NAME_EXIST | ErrorCode::CONSUMER_ALREADY_EXISTS => {
            AlreadyExists
        }
        _ => return None,
    })
}

/// An async-nats error kind's meaning as a [`JetStreamErrorKind`]; `None` where the kind
/// says only "something failed" and the error's source tells more.
pub trait ClassifyKind {
    fn classify(&self) -> Option<JetStreamErrorKind>;
}

impl<K> From<async_nats::error::Error<K>> for JetStreamError
where
    K: ClassifyKind + Clone + fmt::Debug + fmt::Display + PartialEq + Send + Sync + 'static,
{
    fn from(e: async_nats::error::Error<K>) -> Self {
        let kind = e.kind().classify().or_else(|| kind_in_sources(e.source())).unwrap_or(JetStreamErrorKind::Other);
        JetStreamError::new(kind, e)
    }
}

impl From<jetstream::Error> for JetStreamError {
    fn from(e: jetstream::Error) -> Self {
        JetStreamError::new(kind_of_code(e.error_code()).unwrap_or(JetStreamErrorKind::Other), e)
    }
}

/// An error async-nats hands over boxed (`stream.get_consumer`, say): classified by what
/// it turns out to be.
impl From<Box<dyn StdError + Send + Sync + 'static>> for JetStreamError {
    fn from(e: Box<dyn StdError + Send + Sync + 'static>) -> Self {
        let kind = kind_in_sources(Some(e.as_ref())).unwrap_or(JetStreamErrorKind::Other);
        JetStreamError { kind, source: e }
    }
}

/// The first kind found down a source chain: an API error's code, or an async-nats error
/// of a kind that means something (a `Request` error that timed out, say).
fn kind_in_sources(mut cause: Option<&(dyn StdError + 'static)>) -> Option<JetStreamErrorKind> {
    while let Some(e) = cause {
        if let Some(api) = e.downcast_ref::<jetstream::Error>() {
            return kind_of_code(api.error_code());
        }
        if let Some(kind) = classify_dyn(e) {
            return Some(kind);
        }
        cause = e.source();
    }
    None
}

/// Classifies `e` if it is an async-nats error of a kind listed in `all_kinds!`.
fn classify_dyn(e: &(dyn StdError + 'static)) -> Option<JetStreamErrorKind> {
    macro_rules! try_kinds {
        ($($kind:ty),* $(,)?) => {$(
            if let Some(e) = e.downcast_ref::<async_nats::error::Error<$kind>>() {
                return e.kind().classify();
            }
        )*};
    }
    all_kinds!(try_kinds);
    None
}

mod kinds {
    use super::{ClassifyKind, J, JetStreamErrorKind, kind_of_code};
    use async_nats::StatusCode;
    use async_nats::jetstream::{consumer, context, kv, object_store, stream};

    classify!(async_nats::client::PublishErrorKind {});
    classify!(async_nats::client::SubscribeErrorKind {});
    classify!(async_nats::client::FlushErrorKind {});
    classify!(async_nats::client::RequestErrorKind {
        Self::TimedOut => Some(J::TimedOut),
        Self::NoResponders => Some(J::NoResponders),
    });
    classify!(context::PublishErrorKind {
        // The client reads a no-responders status to a publish as "no stream for the subject".
        Self::StreamNotFound => Some(J::NoResponders),
        Self::WrongLastSequence => Some(J::WrongLastSequence),
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(context::RequestErrorKind {
        Self::NoResponders => Some(J::NoResponders),
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(context::ConsumerInfoErrorKind {
        Self::NotFound | Self::StreamNotFound => Some(J::NotFound),
        Self::TimedOut => Some(J::TimedOut),
        Self::NoResponders => Some(J::NoResponders),
        Self::JetStream(e) => kind_of_code(e.error_code()),
    });
    classify!(context::CreateStreamErrorKind {
        Self::NotFound => Some(J::NotFound),
        Self::TimedOut => Some(J::TimedOut),
        Self::JetStreamUnavailable => Some(J::NoResponders),
        Self::JetStream(e) => kind_of_code(e.error_code()),
    });
    classify!(context::GetStreamErrorKind {
        Self::JetStream(e) => kind_of_code(e.error_code()),
    });
    classify!(context::KeyValueErrorKind {});
    classify!(context::CreateKeyValueErrorKind {
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(context::ObjectStoreErrorKind {});
    classify!(stream::DirectGetErrorKind {
        Self::NotFound => Some(J::NotFound),
        Self::TimedOut => Some(J::TimedOut),
        Self::ErrorResponse(status, _) => match *status {
            StatusCode::NOT_FOUND => Some(J::NotFound),
            StatusCode::TIMEOUT => Some(J::TimedOut),
            // Also a stream without `allow_direct`: nobody answers direct gets.
            StatusCode::NO_RESPONDERS => Some(J::NoResponders),
            _ => None,
        },
    });
    classify!(stream::LastRawMessageErrorKind {
        Self::NoMessageFound => Some(J::NotFound),
        Self::JetStream(e) => kind_of_code(e.error_code()),
    });
    classify!(stream::ConsumerErrorKind {
        Self::TimedOut => Some(J::TimedOut),
        Self::JetStream(e) => kind_of_code(e.error_code()),
    });
    classify!(stream::ConsumerCreateStrictErrorKind {
        Self::TimedOut => Some(J::TimedOut),
        Self::AlreadyExists => Some(J::AlreadyExists),
        Self::JetStream(e) => kind_of_code(e.error_code()),
    });
    classify!(stream::ConsumerUpdateErrorKind {
        Self::TimedOut => Some(J::TimedOut),
        Self::DoesNotExist => Some(J::NotFound),
        Self::JetStream(e) => kind_of_code(e.error_code()),
    });
    classify!(consumer::StreamErrorKind {
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(consumer::pull::MessagesErrorKind {
        Self::NoResponders => Some(J::NoResponders),
        Self::ConsumerDeleted => Some(J::NotFound),
    });
    classify!(consumer::pull::OrderedErrorKind {
        Self::NoResponders => Some(J::NoResponders),
        Self::ConsumerDeleted => Some(J::NotFound),
    });
    classify!(consumer::pull::BatchErrorKind {});
    classify!(kv::CreateErrorKind {
        Self::AlreadyExists => Some(J::AlreadyExists),
    });
    classify!(kv::PutErrorKind {});
    classify!(kv::EntryErrorKind {
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(kv::WatchErrorKind {
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(kv::WatcherErrorKind {});
    classify!(kv::UpdateErrorKind {
        // A key's revision is its last sequence in the bucket's stream.
        Self::WrongLastRevision => Some(J::WrongLastSequence),
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(stream::PurgeErrorKind {
        Self::TimedOut => Some(J::TimedOut),
        Self::JetStream(e) => kind_of_code(e.error_code()),
    });
    classify!(stream::DeleteMessageErrorKind {
        Self::TimedOut => Some(J::TimedOut),
        Self::JetStream(e) => kind_of_code(e.error_code()),
    });
    classify!(object_store::InfoErrorKind {
        Self::NotFound => Some(J::NotFound),
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(object_store::GetErrorKind {
        Self::NotFound => Some(J::NotFound),
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(object_store::PutErrorKind {
        Self::TimedOut => Some(J::TimedOut),
    });
    classify!(object_store::DeleteErrorKind {
        Self::NotFound => Some(J::NotFound),
        Self::TimedOut => Some(J::TimedOut),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::{self, PublishError, PublishErrorKind};

    /// The API error a server answers with (as nats-server 2.x words them).
    fn api(code: u64, description: &str) -> jetstream::Error {
        let json = format!(r#"{{"code": 503, "err_code": {code}, "description": "{description}"}}"#);
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn kinds_come_from_error_kinds_and_api_codes_not_text() {
        let full = PublishError::with_source(PublishErrorKind::Other, api(10077, "maximum messages exceeded"));
        let full = JetStreamError::from(full);
        assert_eq!(full.kind(), JetStreamErrorKind::StreamFull);
        assert_eq!(full.to_string(), "publish failed: maximum messages exceeded (code 503, error code 10077)");
        assert!(full.get_ref().downcast_ref::<PublishError>().is_some(), "the async-nats error is kept");
        // The words alone decide nothing.
        let worded = PublishError::with_source(PublishErrorKind::Other, api(10999, "maximum messages exceeded"));
        assert_eq!(JetStreamError::from(worded).kind(), JetStreamErrorKind::Other);

        let wrong =
            PublishError::with_source(PublishErrorKind::WrongLastSequence, api(10071, "wrong last sequence: 1"));
        assert_eq!(JetStreamError::from(wrong).kind(), JetStreamErrorKind::WrongLastSequence);
        let timed_out = PublishError::new(PublishErrorKind::TimedOut);
        assert_eq!(JetStreamError::from(timed_out).kind(), JetStreamErrorKind::TimedOut);
        // A kind down the source chain: a stream lookup whose request nobody answered.
        let nobody = context::RequestError::new(context::RequestErrorKind::NoResponders);
        let lookup = context::GetStreamError::with_source(context::GetStreamErrorKind::Request, nobody);
        assert_eq!(JetStreamError::from(lookup).kind(), JetStreamErrorKind::NoResponders);
        assert_eq!(JetStreamError::other("gone").kind(), JetStreamErrorKind::Other);
    }
}
