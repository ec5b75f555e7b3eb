//! gRPC adapter of the `Taxonomies` service and the wire conversions of taxonomies.

use crate::intent::store::Stored;
use crate::intent::taxonomy::{Intent, Taxonomy};
use crate::intent::Intents;
use crate::proto::v1 as pb;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct TaxonomiesService {
    intents: Intents,
}

impl TaxonomiesService {
    pub fn new(intents: Intents) -> Self {
        Self { intents }
    }
}

pub fn from_wire(t: pb::Taxonomy) -> Taxonomy {
    Taxonomy {
        name: t.name,
        version: t.version,
        description: t.description,
        intents: t.intents.into_iter().map(|i| Intent { label: i.label, description: i.description, examples: i.examples }).collect(),
        out_of_scope: t.out_of_scope_examples,
    }
}

pub fn to_wire(t: &Taxonomy) -> pb::Taxonomy {
    pb::Taxonomy {
        name: t.name.clone(),
        version: t.version.clone(),
        description: t.description.clone(),
        intents: t
            .intents
            .iter()
            .map(|i| pb::Intent { label: i.label.clone(), description: i.description.clone(), examples: i.examples.clone() })
            .collect(),
        out_of_scope_examples: t.out_of_scope.clone(),
    }
}

pub fn info(s: &Stored) -> pb::TaxonomyInfo {
    pb::TaxonomyInfo {
        name: s.taxonomy.name.clone(),
        version: s.taxonomy.version.clone(),
        content_hash: s.content_hash.clone(),
        intents: s.taxonomy.intents.len() as u32,
        examples: s.taxonomy.example_count() as u32,
        encoder: s.encoder.clone(),
        cv_accuracy: s.head.cv_accuracy.unwrap_or(0.0),
        out_of_scope_threshold: s.head.threshold,
        registered_at: Some(prost_types::Timestamp { seconds: s.registered_at, nanos: 0 }),
    }
}

#[tonic::async_trait]
impl pb::taxonomies_server::Taxonomies for TaxonomiesService {
    async fn put_taxonomy(&self, req: Request<pb::PutTaxonomyRequest>) -> Result<Response<pb::PutTaxonomyResponse>, Status> {
        let t = req.into_inner().taxonomy.ok_or_else(|| Status::invalid_argument("taxonomy: missing"))?;
        let started = Instant::now();
        let (stored, trained) = self.intents.put(from_wire(t)).await?;
        Ok(Response::new(pb::PutTaxonomyResponse {
            info: Some(info(&stored)),
            trained,
            train_ms: started.elapsed().as_secs_f64() * 1e3,
        }))
    }

    async fn get_taxonomy(&self, req: Request<pb::GetTaxonomyRequest>) -> Result<Response<pb::GetTaxonomyResponse>, Status> {
        let stored = self.intents.get(&req.into_inner().name)?;
        Ok(Response::new(pb::GetTaxonomyResponse { taxonomy: Some(to_wire(&stored.taxonomy)), info: Some(info(&stored)) }))
    }

    async fn list_taxonomies(&self, _req: Request<pb::ListTaxonomiesRequest>) -> Result<Response<pb::ListTaxonomiesResponse>, Status> {
        let all = self.intents.list()?;
        Ok(Response::new(pb::ListTaxonomiesResponse { taxonomies: all.iter().map(|s| info(s)).collect() }))
    }

    async fn delete_taxonomy(&self, req: Request<pb::DeleteTaxonomyRequest>) -> Result<Response<pb::DeleteTaxonomyResponse>, Status> {
        let deleted = self.intents.delete(&req.into_inner().name).await?;
        Ok(Response::new(pb::DeleteTaxonomyResponse { deleted }))
    }
}
