//! Run documents in MongoDB: one per run (collection `burnin_runs` shipped), upserted by
//! run id, so a retried delivery replaces rather than duplicates. Fed from the durable
//! outbox: a MongoDB that is away delays documents, never loses them.

use std::time::Duration;

use dcs_shared::outbox::Delivery;
use mongodb::bson::{doc, Document};
use mongodb::options::{ClientOptions, FindOneOptions, IndexOptions, ReplaceOptions};
use mongodb::{Client, Collection, IndexModel};
use serde::Deserialize;
use serde_json::Value as Json;

/// `mongodb:` in burnin.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSettings {
    /// Connection string; `DCS_MONGODB_URI` overrides it. Empty: documents wait in the
    /// queue (and are kept as files in `state_dir/runs/`).
    #[serde(default)]
    pub uri: String,
    /// Database.
    #[serde(default = "default_database")]
    pub database: String,
    /// Collection of run documents.
    #[serde(default = "default_collection")]
    pub collection: String,
    /// Server selection and connect timeout.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
}

fn default_database() -> String {
    "dcs".into()
}
fn default_collection() -> String {
    "burnin_runs".into()
}
fn default_timeout() -> f64 {
    5.0
}

impl Default for MongoSettings {
    fn default() -> Self {
        MongoSettings {
            uri: String::new(),
            database: default_database(),
            collection: default_collection(),
            timeout_secs: default_timeout(),
        }
    }
}

impl MongoSettings {
    /// With `DCS_MONGODB_URI` applied; `None` when no URI is set.
    pub fn effective(&self) -> Option<MongoSettings> {
        let mut m = self.clone();
        if let Ok(uri) = std::env::var("DCS_MONGODB_URI") {
            m.uri = uri;
        }
        (!m.uri.trim().is_empty()).then_some(m)
    }
}

/// The run collection.
pub struct RunStore {
    runs: Collection<Document>,
    indexed: bool,
}

impl RunStore {
    /// Prepares a client (no I/O until the first use).
    pub async fn new(s: &MongoSettings) -> Result<RunStore, String> {
        let mut opts = ClientOptions::parse(&s.uri)
            .await
            .map_err(|e| format!("mongodb.uri: {e}"))?;
        let t = Duration::from_secs_f64(s.timeout_secs);
        opts.server_selection_timeout = Some(t);
        opts.connect_timeout = Some(t);
        opts.app_name = Some("burnin".into());
        let client = Client::with_options(opts).map_err(|e| format!("mongodb: {e}"))?;
        Ok(RunStore {
            runs: client.database(&s.database).collection(&s.collection),
            indexed: false,
        })
    }

    /// Stores one queued run document.
    pub async fn store(&mut self, record: &[u8]) -> Delivery {
        let doc: Json = match serde_json::from_slice(record) {
            Ok(d) => d,
            Err(e) => return Delivery::Reject(format!("not a run document: {e}")),
        };
        let Some(id) = doc.get("id").and_then(Json::as_str).map(String::from) else {
            return Delivery::Reject("run document without an id".into());
        };
        let mut d = match mongodb::bson::to_document(&doc) {
            Ok(d) => d,
            Err(e) => return Delivery::Reject(format!("run document to BSON: {e}")),
        };
        d.insert("_id", id.clone());
        if !self.indexed {
            let r = self
                .runs
                .create_indexes([
                    IndexModel::builder().keys(doc! {"start_ns": 1}).build(),
                    IndexModel::builder()
                        .keys(doc! {"modules": 1})
                        .options(IndexOptions::builder().build())
                        .build(),
                ])
                .await;
            if let Err(e) = r {
                return Delivery::Retry(format!("MongoDB burnin_runs indexes: {e}"));
            }
            self.indexed = true;
        }
        match self
            .runs
            .replace_one(doc! {"_id": &id}, d)
            .with_options(ReplaceOptions::builder().upsert(true).build())
            .await
        {
            Ok(_) => Delivery::Done,
            Err(e) if e.to_string().contains("too large") => {
                Delivery::Reject(format!("MongoDB: run {id}: {e}"))
            }
            Err(e) => Delivery::Retry(format!("MongoDB: {e}")),
        }
    }

    /// The run document `id`, if stored.
    pub async fn find(&self, id: &str) -> Result<Option<Json>, String> {
        let d = self
            .runs
            .find_one(doc! {"_id": id})
            .with_options(FindOneOptions::default())
            .await
            .map_err(|e| format!("MongoDB query: {e}"))?;
        d.map(|mut d| {
            d.remove("_id");
            serde_json::to_value(&d).map_err(|e| format!("run document: {e}"))
        })
        .transpose()
    }
}
