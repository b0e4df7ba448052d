//! The prost codec of every Fleet service, with small first buffers.
//!
//! tonic gives each call an encoder and a decoder buffer of 8 KiB to start with. A
//! unary call frees them at once, but a long-lived call keeps them for its whole life:
//! with an agent's `HeartbeatStream` open on the controller for each of 100,000 nodes,
//! those two buffers would be most of what the controller holds per node (about 10 KB
//! resident each, measured at 10,000 agents), for messages of a few hundred bytes. The
//! decoder's buffer starts at [`DECODE_BUFFER`] (a heartbeat's status fits), the
//! encoder's at [`ENCODE_BUFFER`] (a heartbeat's answer is a few bytes); both grow to
//! the largest message as needed.

use std::marker::PhantomData;

use tonic::codec::BufferSettings;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The first size of each call's decoder buffer: a heartbeat's status fits in it.
pub const DECODE_BUFFER: usize = 1024;
/// The first size of each call's encoder buffer.
pub const ENCODE_BUFFER: usize = 128;
/// As tonic's default: how much a stream's encoder gathers before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `application/grpc+proto` through prost, as [`ProstCodec`], with small first
/// buffers.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(DECODE_BUFFER, YIELD_THRESHOLD))
    }
}

#[cfg(test)]
mod tests {
    use tonic::codec::{Codec as _, Decoder as _, Encoder as _};

    use super::*;
    use crate::v1 as pb;

    /// (Messages larger than the first buffer go through whole: every listing the
    /// controller's tests read is.)
    #[test]
    fn the_buffers_start_small() {
        let mut codec = Codec::<pb::HeartbeatResponse, pb::HeartbeatRequest>::default();
        let encoder = format!("{:?}", codec.encoder().buffer_settings());
        let decoder = format!("{:?}", codec.decoder().buffer_settings());
        assert!(encoder.contains("buffer_size: 128,"), "{encoder}");
        assert!(decoder.contains("buffer_size: 1024,"), "{decoder}");
    }
}
