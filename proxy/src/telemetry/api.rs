//! Counting management API calls by method and gRPC code: a tower layer for the tonic server
//! (`Server::builder().layer(ApiMetricsLayer::new(metrics))`).
//!
//! The code of a successful unary call arrives in the trailers, after the body, so the
//! response body is wrapped and the call is counted when its `grpc-status` goes by.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};

use super::Metrics;

/// Wraps a gRPC service so every call is counted in `proxy_api_calls_total`.
#[derive(Debug, Clone)]
pub struct ApiMetricsLayer {
    metrics: Arc<Metrics>,
}

impl ApiMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> ApiMetricsLayer {
        ApiMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for ApiMetricsLayer {
    type Service = ApiMetrics<S>;

    fn layer(&self, inner: S) -> ApiMetrics<S> {
        ApiMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service made by [`ApiMetricsLayer`].
#[derive(Debug, Clone)]
pub struct ApiMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for ApiMetrics<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let method = req.uri().path().to_string();
        let metrics = self.metrics.clone();
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            let mut call = Call {
                metrics,
                method,
                counted: false,
            };
            // Errors come "trailers-only": the status is in the head.
            if let Some(code) = grpc_code(response.headers()) {
                call.count(code);
            }
            Ok(response.map(|inner| CountedBody { inner, call }))
        })
    }
}

struct Call {
    metrics: Arc<Metrics>,
    method: String,
    counted: bool,
}

impl Call {
    fn count(&mut self, code: tonic::Code) {
        if !self.counted {
            self.counted = true;
            self.metrics.api_call(&self.method, code);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The client went away before the call finished.
        self.count(tonic::Code::Cancelled);
    }
}

fn grpc_code(headers: &HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?;
    Some(tonic::Code::from_bytes(value.as_bytes()))
}

/// A response body that counts the call when its trailers pass.
pub struct CountedBody<B> {
    inner: B,
    call: Call,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                    this.call.count(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.count(tonic::Code::Internal),
            Poll::Ready(None) => this.call.count(tonic::Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
