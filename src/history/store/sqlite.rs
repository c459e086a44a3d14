//! The SQLite store, the single-node default: opening and migrating the database, the
//! group-commit batch insert with reservations, the reads behind HTTP paging and reconnect
//! catch-up, and retention.
//!
//! All of SQLite's SQL lives here. The schema is in `migrations/`, applied at start-up;
//! every query is a runtime query, so building needs no database. The writer has a
//! connection of its own, outside the pool (see `writer`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row, Sqlite, SqlitePool};

use futures_util::future::BoxFuture;

use super::{Page, PageRows, Record, Reservations, Store, StoreError};
use crate::config::{HistorySettings, Synchronous};

/// Rows per multi-row INSERT: SQLite allows 32,766 bound parameters; 4 per row.
const ROWS_PER_INSERT: usize = 128;
const PAGE_BYTES: u64 = 4096;
/// Where a room's numbering continues, in a query over `rooms`: the largest of its highest
/// stored seq, the highest one retention deleted (`last_seq`) and its reservation (numbers
/// that may have been delivered before a crash kept them from being stored).
const ROOM_BASE: &str = "SELECT max(last_seq, reserved, coalesce((SELECT max(seq) FROM messages WHERE room = rooms.name), 0)) \
     FROM rooms WHERE name = ?";
const PAGE_BEFORE: &str = "SELECT seq, body FROM messages WHERE room = ? AND seq < ? ORDER BY seq DESC LIMIT ?";
/// Reservation statements are built for this many rooms at most; larger sets are chunked,
/// smaller ones padded to the next power of two (repeating a pair changes nothing), so a
/// handful of statement texts covers every size.
const ROOMS_PER_UPDATE: usize = 64;

pub(crate) struct SqliteStore {
    /// For reads and maintenance.
    pool: SqlitePool,
    /// For the writer's own connection, kept outside the pool: a connection that failed to
    /// write is closed and replaced, and one opened while the file was read-only (SQLite
    /// then falls back to a read-only handle) must never be handed back to the writer.
    options: SqliteConnectOptions,
    /// The writer's connection (only the history writer commits, one call at a time, so
    /// this lock is never contended).
    writer: tokio::sync::Mutex<Option<SqliteConnection>>,
    /// `INSERT … VALUES (?,?,?,?),…` for 1..=ROWS_PER_INSERT rows, built once: sqlx caches a
    /// prepared statement per SQL text, so a fixed set of texts keeps the cache small.
    inserts: Vec<Arc<str>>,
}

impl SqliteStore {
    pub(super) async fn open(settings: &HistorySettings) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = settings.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| StoreError::Dir { dir: dir.display().to_string(), source })?;
        }
        let mut options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(&settings.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match settings.synchronous {
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(5))
            // Checkpoints run in the maintenance task, so that commits (which a delivery
            // may be waiting for) never pay for one.
            .pragma("wal_autocheckpoint", "0");
        if settings.max_db_bytes > 0 {
            let pages = (settings.max_db_bytes / PAGE_BYTES).max(16);
            options = options.pragma("max_page_count", pages.to_string());
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let inserts = (1..=ROWS_PER_INSERT)
            .map(|n| {
                let values = vec!["(?,?,?,?)"; n].join(",");
                Arc::from(format!("INSERT INTO messages (room, seq, created_ms, body) VALUES {values}"))
            })
            .collect();
        Ok(SqliteStore { pool, options, writer: tokio::sync::Mutex::new(None), inserts })
    }

    async fn room_base(&self, room: &str) -> Result<u64, StoreError> {
        let base: Option<i64> = sqlx::query_scalar(ROOM_BASE).bind(room).fetch_optional(&self.pool).await?;
        Ok(base.unwrap_or(0).max(0) as u64)
    }

    /// Does `write` on the writer's connection (opened first if need be). A connection
    /// whose write failed is closed: the next write tries a fresh one (a connection opened
    /// while the file was read-only stays read-only).
    async fn write(&self, write: Write<'_>) -> Result<(), StoreError> {
        let mut slot = self.writer.lock().await;
        if slot.is_none() {
            *slot = Some(self.options.connect().await?);
        }
        let conn = slot.as_mut().ok_or(StoreError::Sql(sqlx::Error::PoolClosed))?;
        let result = match write {
            Write::Commit(rows, reserve) => self.commit_on(conn, rows, reserve).await,
            Write::Release(rooms) => SqliteStore::release_on(conn, rooms).await,
        };
        if result.is_err()
            && let Some(conn) = slot.take()
        {
            let _ = conn.close().await;
        }
        result
    }

    /// Commits a batch atomically, with the rooms' new reservations (`(room, reserved)`,
    /// only ever raised here); a trigger gives a room its row in `rooms`. A batch that fits
    /// one statement and reserves nothing is one round trip (SQLite makes the statement its
    /// own transaction); anything more is wrapped in an explicit transaction.
    async fn commit_on(
        &self,
        conn: &mut SqliteConnection,
        rows: &[Record],
        reserve: &Reservations,
    ) -> Result<(), StoreError> {
        if rows.len() <= ROWS_PER_INSERT && reserve.is_empty() {
            self.insert_chunk(conn, rows).await?;
            return Ok(());
        }
        let mut tx = conn.begin().await?;
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            self.insert_chunk(&mut tx, chunk).await?;
        }
        set_reserved(&mut tx, reserve, "max(reserved, v.column2)").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Lowers the reservations of quiet rooms to their last number: `(room, last_seq)`.
    async fn release_on(conn: &mut SqliteConnection, rooms: &Reservations) -> Result<(), StoreError> {
        let mut tx = conn.begin().await?;
        set_reserved(&mut tx, rooms, "v.column2").await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_chunk(&self, conn: &mut sqlx::SqliteConnection, chunk: &[Record]) -> Result<(), StoreError> {
        let mut q = sqlx::query(AssertSqlSafe(self.inserts[chunk.len() - 1].clone()));
        for row in chunk {
            q = q
                .bind(&*row.room)
                .bind(row.seq as i64)
                .bind(row.created_ms)
                .bind(std::str::from_utf8(&row.body).unwrap_or_default());
        }
        q.execute(conn).await?;
        Ok(())
    }

    async fn page(&self, room: &str, page: Page, limit: u32) -> Result<PageRows, StoreError> {
        let fetch = i64::from(limit) + 1;
        // The latest page is the page before a sequence number no room reaches.
        let (sql, bound) = match page {
            Page::After(after) => {
                ("SELECT seq, body FROM messages WHERE room = ? AND seq > ? ORDER BY seq ASC LIMIT ?", sql_seq(after))
            }
            Page::Before(before) => (PAGE_BEFORE, sql_seq(before)),
            Page::Latest => (PAGE_BEFORE, i64::MAX),
        };
        let mut rows: Vec<(u64, String)> = sqlx::query(sql)
            .bind(room)
            .bind(bound)
            .bind(fetch)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| (r.get::<i64, _>(0) as u64, r.get::<String, _>(1)))
            .collect();
        let overflow = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        if !matches!(page, Page::After(_)) {
            rows.reverse();
        }
        let (newer, older) = match (&page, rows.first(), rows.last()) {
            (Page::After(_), Some(&(first, _)), _) => (overflow, self.exists_before(room, first).await?),
            (Page::Before(_), _, Some(&(last, _))) => (self.exists_after(room, last).await?, overflow),
            (Page::Latest, _, _) => (false, overflow),
            // An empty page: nothing beyond it in the direction asked.
            (Page::After(after), None, _) => (false, self.exists_before(room, after.saturating_add(1)).await?),
            (Page::Before(before), _, None) => (self.exists_after(room, before.saturating_sub(1)).await?, false),
        };
        Ok((rows, newer, older))
    }

    async fn exists_before(&self, room: &str, seq: u64) -> Result<bool, StoreError> {
        self.exists("SELECT EXISTS (SELECT 1 FROM messages WHERE room = ? AND seq < ?)", room, seq).await
    }

    async fn exists_after(&self, room: &str, seq: u64) -> Result<bool, StoreError> {
        self.exists("SELECT EXISTS (SELECT 1 FROM messages WHERE room = ? AND seq > ?)", room, seq).await
    }

    async fn exists(&self, sql: &'static str, room: &str, seq: u64) -> Result<bool, StoreError> {
        let row = sqlx::query(sql).bind(room).bind(sql_seq(seq)).fetch_one(&self.pool).await?;
        Ok(row.get::<i64, _>(0) != 0)
    }

    async fn range(&self, room: &str, after: u64, upto: u64, max: u32) -> Result<Vec<(u64, String)>, StoreError> {
        let mut rows: Vec<(u64, String)> = sqlx::query(
            "SELECT seq, body FROM messages WHERE room = ? AND seq > ? AND seq <= ? ORDER BY seq DESC LIMIT ?",
        )
        .bind(room)
        .bind(sql_seq(after))
        .bind(sql_seq(upto))
        .bind(i64::from(max))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| (r.get::<i64, _>(0) as u64, r.get::<String, _>(1)))
        .collect();
        rows.reverse();
        Ok(rows)
    }

    /// Retention by count: deletes, in chunks, what is older than each room's newest
    /// `keep` messages. Sequence numbers have no gaps, so "older than the newest `keep`"
    /// is `seq <= newest - keep`. Returns the number of rows deleted.
    async fn trim_rooms(&self, keep: u64, chunk: i64) -> Result<u64, StoreError> {
        let rooms = sqlx::query(
            "SELECT name, newest FROM (SELECT name, \
                 (SELECT max(seq) FROM messages WHERE room = rooms.name) AS newest, \
                 (SELECT min(seq) FROM messages WHERE room = rooms.name) AS oldest FROM rooms) \
             WHERE oldest <= newest - ?",
        )
        .bind(keep as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut deleted = 0;
        for r in rooms {
            let (name, newest): (String, i64) = (r.get(0), r.get(1));
            let cutoff = newest - keep as i64;
            deleted += self
                .delete_in_chunks(chunk, || {
                    sqlx::query(
                        "DELETE FROM messages WHERE rowid IN \
                         (SELECT rowid FROM messages WHERE room = ? AND seq <= ? ORDER BY seq LIMIT ?)",
                    )
                    .bind(name.clone())
                    .bind(cutoff)
                    .bind(chunk)
                })
                .await?;
        }
        Ok(deleted)
    }

    /// Retention by age: deletes, in chunks, messages created before `cutoff_ms`. Rows are
    /// stored in publishing order, so the old ones are the first rowids: each chunk is the
    /// oldest `chunk` rows, of which those before the cutoff go, and a chunk that is not
    /// all old is the last. (A message stamped earlier than one stored before it, by a
    /// clock stepping back, waits for its elders; it is never deleted early.)
    async fn expire(&self, cutoff_ms: i64, chunk: i64) -> Result<u64, StoreError> {
        self.delete_in_chunks(chunk, || {
            sqlx::query(
                "DELETE FROM messages WHERE rowid IN (SELECT rowid FROM messages ORDER BY rowid LIMIT ?) \
                 AND created_ms < ?",
            )
            .bind(chunk)
            .bind(cutoff_ms)
        })
        .await
    }

    /// Runs a `DELETE … LIMIT chunk` until it deletes fewer than `chunk` rows: small
    /// transactions, so the writer never waits long for the database.
    async fn delete_in_chunks<'q>(
        &self,
        chunk: i64,
        query: impl Fn() -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let n = query().execute(&self.pool).await?.rows_affected();
            deleted += n;
            if n < chunk as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Moves committed pages from the WAL into the database without blocking writers.
    async fn checkpoint(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        if let Some(conn) = self.writer.lock().await.take() {
            let _ = conn.close().await;
        }
        let _ = self.checkpoint().await;
        self.pool.close().await;
    }
}

/// A sequence number as SQLite stores it. Numbers a client sends (cursors, `since`) can
/// exceed any stored one; clamping keeps their meaning ("beyond everything") instead of
/// letting them wrap to negative.
fn sql_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// `UPDATE rooms SET reserved = <value> FROM (VALUES (room, n), …) AS v WHERE name = room`,
/// in chunks of at most [`ROOMS_PER_UPDATE`] pairs, each padded to a power of two.
async fn set_reserved(
    conn: &mut sqlx::SqliteConnection,
    pairs: &Reservations,
    value: &'static str,
) -> Result<(), StoreError> {
    for chunk in pairs.chunks(ROOMS_PER_UPDATE) {
        let n = chunk.len().next_power_of_two();
        let values = vec!["(?,?)"; n].join(",");
        let sql =
            format!("UPDATE rooms SET reserved = {value} FROM (VALUES {values}) AS v WHERE rooms.name = v.column1");
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for i in 0..n {
            let (room, seq) = &chunk[i.min(chunk.len() - 1)];
            q = q.bind(&**room).bind(*seq as i64);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// What the writer's connection is asked to do.
enum Write<'a> {
    Commit(&'a [Record], &'a Reservations),
    Release(&'a Reservations),
}

/// Rows deleted per retention statement: small transactions, so the writer never waits
/// long for the database.
const RETENTION_CHUNK: i64 = 1000;

impl Store for SqliteStore {
    fn room_base<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(SqliteStore::room_base(self, room))
    }

    fn commit<'a>(&'a self, rows: &'a [Record], reserve: &'a Reservations) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write(Write::Commit(rows, reserve)))
    }

    fn release<'a>(&'a self, rooms: &'a Reservations) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write(Write::Release(rooms)))
    }

    fn page<'a>(&'a self, room: &'a str, page: Page, limit: u32) -> BoxFuture<'a, Result<PageRows, StoreError>> {
        Box::pin(SqliteStore::page(self, room, page, limit))
    }

    fn range<'a>(
        &'a self,
        room: &'a str,
        after: u64,
        upto: u64,
        max: u32,
    ) -> BoxFuture<'a, Result<Vec<(u64, String)>, StoreError>> {
        Box::pin(SqliteStore::range(self, room, after, upto, max))
    }

    fn trim_rooms(&self, keep: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(SqliteStore::trim_rooms(self, keep, RETENTION_CHUNK))
    }

    fn expire(&self, cutoff_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(SqliteStore::expire(self, cutoff_ms, RETENTION_CHUNK))
    }

    fn maintain(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.checkpoint())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(SqliteStore::close(self))
    }
}
