//! `proxy.v1.TlsService`: the on-demand allowlist, certificates, renewals, ACME status.

use std::sync::Arc;

use proxy_proto::v1 as pb;
use proxy_proto::v1::tls_service_server::{TlsService, TlsServiceServer};
use tonic::{Request, Response, Status};

use crate::tls::{CertInfo, CertSource, Tls, TlsError};
use crate::Shutdown;

/// The TlsService implementation.
#[derive(Clone)]
pub struct TlsApi {
    /// Certificates and the on-demand policy (`None` where TLS does not run).
    tls: Option<Arc<Tls>>,
    /// Changes are refused once it fires.
    shutdown: Shutdown,
}

impl TlsApi {
    /// A service over `tls`, taking no changes once `shutdown` fires.
    pub fn new(tls: Option<Arc<Tls>>, shutdown: Shutdown) -> Self {
        TlsApi { tls, shutdown }
    }

    /// The service, ready to be added to a server.
    pub(super) fn server(self) -> TlsServiceServer<TlsApi> {
        TlsServiceServer::new(self)
    }

    fn tls(&self) -> Result<&Arc<Tls>, Status> {
        self.tls
            .as_ref()
            .ok_or_else(|| Status::unavailable("TLS is not running in this process"))
    }

    fn writable(&self) -> Result<&Arc<Tls>, Status> {
        if self.shutdown.is_triggered() {
            return Err(Status::unavailable(
                "proxyd is shutting down and takes no changes",
            ));
        }
        self.tls()
    }
}

fn status(e: TlsError) -> Status {
    match e {
        TlsError::Invalid { field, reason } => {
            Status::invalid_argument(format!("{field}: {reason}"))
        }
        TlsError::Certificate(reason) => Status::invalid_argument(format!("cert_pem: {reason}")),
        e @ TlsError::NotFound(_) => Status::not_found(e.to_string()),
        e @ (TlsError::Declarative(_) | TlsError::Registered(_)) => {
            Status::failed_precondition(e.to_string())
        }
        e @ (TlsError::Acme(_) | TlsError::Unavailable(_)) => Status::unavailable(e.to_string()),
        e @ TlsError::Conflict(_) => Status::aborted(e.to_string()),
        e @ (TlsError::Store(_) | TlsError::File { .. }) => {
            tracing::error!(error = %e, "TLS store failed during a management call");
            Status::internal(e.to_string())
        }
    }
}

fn certificate(info: &CertInfo) -> pb::Certificate {
    let source = match info.source {
        CertSource::File => pb::CertificateSource::File,
        CertSource::Api => pb::CertificateSource::Api,
        CertSource::Acme => pb::CertificateSource::Acme,
        CertSource::Registered => pb::CertificateSource::Registered,
    };
    pb::Certificate {
        name: info.name.clone(),
        names: info.names.clone(),
        issuer: info.issuer.clone(),
        not_before: info.not_before,
        not_after: info.not_after,
        source: source as i32,
        renew_at: info.renew_at(),
    }
}

#[tonic::async_trait]
impl TlsService for TlsApi {
    async fn list_allowlist(
        &self,
        _request: Request<pb::ListAllowlistRequest>,
    ) -> Result<Response<pb::ListAllowlistResponse>, Status> {
        let tls = self.tls()?;
        let (config_entries, api_entries) = tls.allowlist();
        Ok(Response::new(pb::ListAllowlistResponse {
            config_entries,
            api_entries,
            on_demand_enabled: tls.status().on_demand,
        }))
    }

    async fn add_allowlist_entry(
        &self,
        request: Request<pb::AddAllowlistEntryRequest>,
    ) -> Result<Response<pb::AddAllowlistEntryResponse>, Status> {
        let pattern = self
            .writable()?
            .allow(&request.into_inner().pattern)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::AddAllowlistEntryResponse { pattern }))
    }

    async fn remove_allowlist_entry(
        &self,
        request: Request<pb::RemoveAllowlistEntryRequest>,
    ) -> Result<Response<pb::RemoveAllowlistEntryResponse>, Status> {
        self.writable()?
            .disallow(&request.into_inner().pattern)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RemoveAllowlistEntryResponse {}))
    }

    async fn list_certificates(
        &self,
        _request: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        let certificates = self.tls()?.certificates().iter().map(certificate).collect();
        Ok(Response::new(pb::ListCertificatesResponse { certificates }))
    }

    async fn upload_certificate(
        &self,
        request: Request<pb::UploadCertificateRequest>,
    ) -> Result<Response<pb::UploadCertificateResponse>, Status> {
        let r = request.into_inner();
        if r.key_pem.trim().is_empty() {
            return Err(Status::invalid_argument(
                "key_pem: must hold the private key",
            ));
        }
        let info = self
            .writable()?
            .upload(&r.name, &r.cert_pem, &r.key_pem)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UploadCertificateResponse {
            certificate: Some(certificate(&info)),
        }))
    }

    async fn remove_certificate(
        &self,
        request: Request<pb::RemoveCertificateRequest>,
    ) -> Result<Response<pb::RemoveCertificateResponse>, Status> {
        self.writable()?
            .remove(&request.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RemoveCertificateResponse {}))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let info = self
            .writable()?
            .renew(&request.into_inner().name)
            .await
            .map_err(|e| match e {
                e @ TlsError::Acme(_) if e.to_string().contains("no [tls.acme]") => {
                    Status::failed_precondition(e.to_string())
                }
                other => status(other),
            })?;
        Ok(Response::new(pb::RenewCertificateResponse {
            certificate: Some(certificate(&info)),
        }))
    }

    async fn get_acme_status(
        &self,
        _request: Request<pb::GetAcmeStatusRequest>,
    ) -> Result<Response<pb::GetAcmeStatusResponse>, Status> {
        let tls = self.tls()?;
        let s = tls.status();
        let mut response = pb::GetAcmeStatusResponse {
            refused_handshakes: s.refused_handshakes,
            on_demand_enabled: s.on_demand,
            ..Default::default()
        };
        if let Some(acme) = s.acme {
            response.configured = true;
            response.directory = acme.issuer.directory;
            response.account_ready = acme.issuer.account_ready;
            response.pending = acme.issuer.pending;
            response.backing_off = acme
                .issuer
                .backing_off
                .into_iter()
                .map(|(name, left)| pb::BackingOff {
                    name,
                    remaining_seconds: left.as_secs(),
                })
                .collect();
            // In a fleet the limits count the fleet's orders, so the status does too; if
            // etcd does not answer, this node's own orders are all it can say.
            let orders = match tls.fleet_orders_last_hour().await {
                Some(Ok(fleet)) => fleet,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "the fleet's order log could not be read; reporting this node's orders");
                    acme.issuer.orders_last_hour
                }
                None => acme.issuer.orders_last_hour,
            };
            response.orders_last_hour = u64::try_from(orders).unwrap_or(u64::MAX);
            response.orders = acme.orders;
            response.issued = acme.issued;
            response.failed = acme.failed;
            response.renewals = acme.renewals;
            response.last_error = acme.issuer.last_error.unwrap_or_default();
        }
        Ok(Response::new(response))
    }
}
