//! tonic refuses a request over its decoding limit with OUT_OF_RANGE ("Error, decoded
//! message length too large"); grpc's other libraries, and every other SDK, say
//! RESOURCE_EXHAUSTED, grpc's code for a message over the size cap. [`SizeStatus`] says it
//! too, so a host gets one answer whichever SDK its plugin is written with
//! (docs/protocol.md, "What a server owes a lying or broken host").
//!
//! Only an answer that carries its status in the headers (a call refused before its handler
//! ran: Call, CallBatch, CallStream) and whose message is tonic's own words for that is
//! changed. An `Events` stream sent its headers when it opened: a host event over the limit
//! reaches the handler as tonic's error, which [`restated`] turns into the same status for
//! the stream's trailers. A reply over the limit fails in the trailers, after the headers
//! went: it stays OUT_OF_RANGE ("encoded message length too large"), which the dispatcher
//! reads by its words.

use std::convert::Infallible;

use tonic::codegen::http::{self, HeaderValue};
use tonic::codegen::{BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

/// tonic's words for a request over the decoding limit, as percent-encoded in `grpc-message`.
const DECODED_TOO_LARGE: &[u8] = b"decoded%20message%20length%20too%20large";
/// The same words as tonic's `Status` carries them, before they go on the wire.
const DECODED_TOO_LARGE_TEXT: &str = "decoded message length too large";
const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";

/// A gRPC service whose "request too large" answers are RESOURCE_EXHAUSTED.
#[derive(Clone)]
pub(crate) struct SizeStatus<S>(pub(crate) S);

impl<S, B> Service<http::Request<B>> for SizeStatus<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let answer = self.0.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            restate(response.headers_mut());
            Ok(response)
        })
    }
}

impl<S: NamedService> NamedService for SizeStatus<S> {
    const NAME: &'static str = S::NAME;
}

/// `status` as a stream's trailers should carry it: tonic's refusal of a request message
/// over the decoding limit is RESOURCE_EXHAUSTED, any other status is left alone.
pub(crate) fn restated(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains(DECODED_TOO_LARGE_TEXT) {
        Status::resource_exhausted(status.message())
    } else {
        status
    }
}

fn restate(headers: &mut http::HeaderMap) {
    let too_large = headers
        .get("grpc-status")
        .is_some_and(|status| status == OUT_OF_RANGE)
        && headers.get("grpc-message").is_some_and(|message| {
            message
                .as_bytes()
                .windows(DECODED_TOO_LARGE.len())
                .any(|w| w == DECODED_TOO_LARGE)
        });
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static(RESOURCE_EXHAUSTED));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(status: &'static str, message: &'static str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static(status));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        headers
    }

    #[test]
    fn a_request_over_the_limit_is_resource_exhausted() {
        let mut refused = headers(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%2070000000%20bytes",
        );
        restate(&mut refused);
        assert_eq!(refused["grpc-status"], "8");
    }

    #[test]
    fn a_stream_message_over_the_limit_is_resource_exhausted() {
        let refused = restated(Status::out_of_range(
            "Error, decoded message length too large: found 70000000 bytes, the limit is: 67108864 bytes",
        ));
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("70000000 bytes"));
        let other = restated(Status::out_of_range("index past the end"));
        assert_eq!(other.code(), Code::OutOfRange);
        let reply = restated(Status::out_of_range(
            "Error, encoded message length too large",
        ));
        assert_eq!(reply.code(), Code::OutOfRange);
    }

    #[test]
    fn any_other_out_of_range_is_left_alone() {
        let mut other = headers("11", "index%20past%20the%20end");
        restate(&mut other);
        assert_eq!(other["grpc-status"], "11");
        let mut reply = headers("11", "Error,%20encoded%20message%20length%20too%20large");
        restate(&mut reply);
        assert_eq!(reply["grpc-status"], "11");
    }
}
