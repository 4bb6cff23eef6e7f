//! Local adapters: files under a data dir, SQLite for records, ledger and queue, HMAC uploads.

pub mod files;
pub mod presign;
pub mod sqlite;

pub use files::FileBlobStore;
pub use presign::{LocalPresigner, UploadGrant};
pub use sqlite::{
    DeadLetter, SqliteDb, SqliteQueue, SqliteRepository, SqliteVectorStore, TokenUse,
};
