//! Writing run records to MongoDB: result files into GridFS (stable ids, so a retried
//! write replaces rather than duplicates), then the run document, upserted by
//! `run_id`. Indexes (`run_id` unique, `start_time`, `modules`) are made on first use.

use std::time::Duration;

use futures_util::io::AsyncWriteExt as _;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::ErrorKind;
use mongodb::gridfs::GridFsBucket;
use mongodb::options::{ClientOptions, GridFsBucketOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};
use tokio::io::AsyncReadExt as _;

use crate::config::MongoSettings;
use crate::outbox::Delivery;
use crate::record::{file_id, RunRecord};

/// The run store.
pub struct MongoStore {
    runs: Collection<Document>,
    bucket: GridFsBucket,
    indexed: bool,
}

fn classify(context: &str, e: mongodb::error::Error) -> Delivery {
    let why = format!("MongoDB {context}: {e}");
    match *e.kind {
        ErrorKind::BsonSerialization(_) | ErrorKind::InvalidArgument { .. } => {
            Delivery::Reject(why)
        }
        _ => Delivery::Retry(why),
    }
}

impl MongoStore {
    /// Prepares a client (no I/O until the first write).
    pub async fn new(s: &MongoSettings) -> Result<MongoStore, String> {
        let mut opts = ClientOptions::parse(&s.uri)
            .await
            .map_err(|e| format!("mongodb.uri: {e}"))?;
        let t = Duration::from_secs_f64(s.timeout_secs);
        opts.server_selection_timeout = Some(t);
        opts.connect_timeout = Some(t);
        opts.app_name = Some("ph2acf-bridge".into());
        let client = Client::with_options(opts).map_err(|e| format!("mongodb: {e}"))?;
        let db = client.database(&s.database);
        Ok(MongoStore {
            runs: db.collection(&s.collection),
            bucket: db.gridfs_bucket(
                GridFsBucketOptions::builder()
                    .bucket_name(s.bucket.clone())
                    .build(),
            ),
            indexed: false,
        })
    }

    async fn ensure_indexes(&mut self) -> Result<(), mongodb::error::Error> {
        if self.indexed {
            return Ok(());
        }
        let unique = IndexOptions::builder().unique(true).build();
        self.runs
            .create_indexes([
                IndexModel::builder()
                    .keys(doc! {"run_id": 1})
                    .options(unique)
                    .build(),
                IndexModel::builder().keys(doc! {"start_time": 1}).build(),
                IndexModel::builder().keys(doc! {"modules": 1}).build(),
            ])
            .await?;
        self.indexed = true;
        Ok(())
    }

    async fn upload(&self, rec: &RunRecord) -> Result<(), Delivery> {
        let Some(results) = &rec.results else {
            return Ok(());
        };
        for f in &results.files {
            let id = Bson::String(file_id(&rec.run_id, &f.name));
            let mut file = match tokio::fs::File::open(&f.path).await {
                Ok(file) => file,
                Err(e) => {
                    // Gone since the run ended (cleaned up by hand?): the document says
                    // the size it had; nothing to retry.
                    tracing::warn!(path = %f.path.display(), error = %e, "result file not uploaded");
                    continue;
                }
            };
            let existing = self
                .bucket
                .find_one(doc! {"_id": id.clone()})
                .await
                .map_err(|e| classify("GridFS lookup", e))?;
            if existing.is_some() {
                self.bucket
                    .delete(id.clone())
                    .await
                    .map_err(|e| classify("GridFS delete", e))?;
            }
            let mut up = self
                .bucket
                .open_upload_stream(format!("Run_{}/{}", rec.run_number.unwrap_or(0), f.name))
                .id(id)
                .metadata(doc! {"run_id": &rec.run_id, "file": &f.name})
                .await
                .map_err(|e| classify("GridFS upload", e))?;
            let mut buf = vec![0u8; 1024 * 1024];
            loop {
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| Delivery::Retry(format!("reading {}: {e}", f.path.display())))?;
                if n == 0 {
                    break;
                }
                if let Err(e) = up.write_all(&buf[..n]).await {
                    let _ = up.abort().await;
                    return Err(Delivery::Retry(format!("GridFS upload of {}: {e}", f.name)));
                }
            }
            up.close()
                .await
                .map_err(|e| Delivery::Retry(format!("GridFS upload of {}: {e}", f.name)))?;
        }
        Ok(())
    }

    /// Stores `rec` (files, then the document).
    pub async fn write(&mut self, rec: &RunRecord) -> Delivery {
        if let Err(e) = self.ensure_indexes().await {
            return classify("creating indexes", e);
        }
        if let Err(d) = self.upload(rec).await {
            return d;
        }
        let doc = rec.document_within_limit();
        match self
            .runs
            .replace_one(doc! {"run_id": &rec.run_id}, doc)
            .upsert(true)
            .await
        {
            Ok(_) => Delivery::Done,
            Err(e) => classify("writing the run document", e),
        }
    }

    /// The run document of `run_id`.
    pub async fn find(&self, run_id: &str) -> Result<Option<Document>, String> {
        self.runs
            .find_one(doc! {"run_id": run_id})
            .await
            .map_err(|e| format!("MongoDB: {e}"))
    }
}
