//! Fleet's wire contract. `fleetctl` and the controller know an agent only
//! through these types; the `.proto` files under `proto/fleet/v1` are the source.

/// `fleet.v1`: the agent and controller services and their messages.
pub mod v1 {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("fleet.v1");
}

/// The API this build speaks: the proto package of its services.
pub const PROTOCOL: &str = "fleet.v1";

/// The build of the crate that calls it: its version, the git commit given as
/// `FLEET_GIT_COMMIT` at build time (empty without), and [`PROTOCOL`].
#[macro_export]
macro_rules! build_version {
    () => {
        $crate::v1::VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: option_env!("FLEET_GIT_COMMIT").unwrap_or("").to_string(),
            protocol: $crate::PROTOCOL.to_string(),
        }
    };
}

/// Carrying out the controller's calls on a heartbeat stream.
pub mod commands;

/// The codec of every service: small first buffers for long-lived calls.
pub mod codec;

/// The rules of a rollout spec's amounts (batches, budgets), shared by fleetctl and
/// the controller.
pub mod rules;

/// Several controllers on one store: how a follower points clients at the leader.
pub mod ha {
    /// Response metadata on a follower's `UNAVAILABLE`: the leader's URL (absent
    /// while no leader is elected). Clients send the change there.
    pub const LEADER_METADATA: &str = "fleet-leader";
    /// Response metadata on an `UNAVAILABLE` from a controller whose store has no
    /// quorum: nothing was changed, and no other controller can change anything now.
    pub const NO_QUORUM_METADATA: &str = "fleet-no-quorum";
}
/// The bounds on what an agent may report about itself, shared by the agent (checked at
/// start) and the controller (checked on every heartbeat).
pub mod limits;

/// Encoded `FileDescriptorSet` of every Fleet proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fleet_descriptor.bin"));
