//! Where history is kept: the [`Store`] interface the rest of history uses, and its
//! implementations (SQLite, the single-node default, in [`sqlite`]).
//!
//! The interface is what a store must do for rtgate's guarantees, in its own terms: commit
//! a batch of messages together with rooms' sequence reservations (atomically), say where
//! a room's numbering continues, read pages and catch-up ranges, and enforce retention.
//! Connections, statements and migrations are each store's own affair. Methods return
//! boxed futures so that the store is chosen at start-up and held as `Box<dyn Store>`.

mod sqlite;

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::config::HistorySettings;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the database directory {dir}: {source}")]
    Dir { dir: String, source: std::io::Error },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// One message to persist: the exact JSON text live subscribers received (its `seq`
/// included), so that replay returns the same objects without re-encoding them.
pub(crate) struct Record {
    pub room: Arc<str>,
    pub seq: u64,
    pub created_ms: i64,
    pub body: bytes::Bytes,
}

/// Which page of a room's history to read.
pub enum Page {
    After(u64),
    Before(u64),
    Latest,
}

/// A page's messages, ascending, and whether messages exist beyond each end of it:
/// `(messages, newer_exist, older_exist)`.
pub(crate) type PageRows = (Vec<(u64, String)>, bool, bool);

/// `(room, seq)` pairs: a reservation to raise or lower.
pub(crate) type Reservations = [(Arc<str>, u64)];

pub(crate) trait Store: Send + Sync {
    /// Where `room`'s numbering continues: the largest of its highest stored number, the
    /// highest one retention deleted, and its reservation (0 for a room with no history).
    fn room_base<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Stores a batch atomically, raising the given reservations (never lowering one) in the
    /// same transaction. Called by the history writer only, one call at a time.
    fn commit<'a>(&'a self, rows: &'a [Record], reserve: &'a Reservations) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Sets the reservations of quiet rooms back to their last number. Writer only.
    fn release<'a>(&'a self, rooms: &'a Reservations) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Up to `limit` messages of a page, ascending.
    fn page<'a>(&'a self, room: &'a str, page: Page, limit: u32) -> BoxFuture<'a, Result<PageRows, StoreError>>;

    /// The newest `max` messages with `after < seq <= upto`, ascending (reconnect catch-up).
    fn range<'a>(
        &'a self,
        room: &'a str,
        after: u64,
        upto: u64,
        max: u32,
    ) -> BoxFuture<'a, Result<Vec<(u64, String)>, StoreError>>;

    /// Retention by count: deletes what is older than each room's newest `keep` messages.
    /// Returns the number of messages deleted.
    fn trim_rooms(&self, keep: u64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Retention by age: deletes messages created before `cutoff_ms`.
    fn expire(&self, cutoff_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Periodic housekeeping the store needs (SQLite: a WAL checkpoint), once a second.
    fn maintain(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Finishes housekeeping and closes every connection (shutdown).
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Opens the configured store. (Boxed, to sit in an `ArcSwapOption`, which needs a sized
/// type.)
pub(crate) async fn open(settings: &HistorySettings) -> Result<Box<dyn Store>, StoreError> {
    Ok(Box::new(sqlite::SqliteStore::open(settings).await?))
}
