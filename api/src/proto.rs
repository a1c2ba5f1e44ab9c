//! The gRPC contracts, generated from `proto/` at build time: one source
//! for the zone controller's server and the agent's client.

/// Agent <-> zone controller (port 5678): enrolment, renewal, config stream.
pub mod agent {
    /// Version 1 of the agent protocol.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("weft.agent.v1");
    }

    /// The Hello feature of agents that apply `ServicePatch`es and keep
    /// the bundle a delta leaves out (see `Hello.features`).
    pub const ENDPOINT_PATCHES: &str = "endpoint-patches";

    /// The Hello feature of agents that join a service sent in parts:
    /// consecutive entries of one update's `services` with the same
    /// namespace and name are one service, with the first entry's other
    /// fields and every entry's endpoints in order. The zone sends a
    /// service larger than its message bound that way, so that no message
    /// grows with the size of a service.
    pub const SERVICE_PARTS: &str = "service-parts";

    /// The order of a service's endpoints on both sides of the config
    /// stream: by address, agent, SPIFFE ID, readiness, then location
    /// (zone, region, zone, subzone: ties only between equal addresses,
    /// and empty for zones that predate them, so the order of the first
    /// four fields is unchanged). The zone sorts each service's endpoints
    /// this way and an agent applying a `ServicePatch` sorts the result the
    /// same way, so a patched view is the very view the zone would have
    /// sent whole (and hashed). Equal in this order is equal in every
    /// field: a patch removes an endpoint by it.
    pub fn endpoint_order(a: &v1::Endpoint, b: &v1::Endpoint) -> std::cmp::Ordering {
        #[allow(clippy::type_complexity)]
        fn key(e: &v1::Endpoint) -> ((&str, &str, &str), bool, (&str, &str, &str, &str)) {
            (
                (e.address.as_str(), e.agent.as_str(), e.spiffe_id.as_str()),
                e.ready,
                (
                    e.zone.as_str(),
                    e.locality_region.as_str(),
                    e.locality_zone.as_str(),
                    e.locality_subzone.as_str(),
                ),
            )
        }
        key(a).cmp(&key(b))
    }
}

#[cfg(test)]
mod tests {
    use super::agent::v1::{agent_message, AgentMessage, Hello, Nack};
    use prost::Message;

    #[test]
    fn messages_round_trip_and_reject_truncation() {
        let hello = AgentMessage {
            message: Some(agent_message::Message::Hello(Hello {
                agent_id: "vm-1".into(),
                applied_version: "42".into(),
                ..Default::default()
            })),
        };
        let bytes = hello.encode_to_vec();
        assert_eq!(AgentMessage::decode(bytes.as_slice()).unwrap(), hello);
        // A frame cut short is an error, never a partial message.
        assert!(AgentMessage::decode(&bytes[..bytes.len() - 1]).is_err());

        let nack = AgentMessage {
            message: Some(agent_message::Message::Nack(Nack {
                version: "43".into(),
                reason: "services[0].virtual_ip: not an IP".into(),
            })),
        };
        assert_eq!(
            AgentMessage::decode(nack.encode_to_vec().as_slice()).unwrap(),
            nack
        );
    }

    /// `weft.agent.v1.Endpoint` as agents and zones that predate
    /// locality know it.
    #[derive(Clone, PartialEq, prost::Message)]
    struct EndpointV1 {
        #[prost(string, tag = "1")]
        address: String,
        #[prost(string, tag = "2")]
        agent: String,
        #[prost(string, tag = "3")]
        spiffe_id: String,
        #[prost(bool, tag = "4")]
        ready: bool,
    }

    #[test]
    fn endpoint_locality_is_invisible_to_older_peers_and_free_when_unset() {
        use super::agent::v1::Endpoint;
        let old = EndpointV1 {
            address: "10.0.0.1".into(),
            agent: "10.0.0.1:15008".into(),
            spiffe_id: "spiffe://td/ns/default/sa/api".into(),
            ready: true,
        };
        let unlabelled = Endpoint {
            address: old.address.clone(),
            agent: old.agent.clone(),
            spiffe_id: old.spiffe_id.clone(),
            ready: true,
            ..Default::default()
        };
        // Unset, the new fields cost no byte: a zone's views (and their
        // content-hash versions) stay as they were for unlabelled meshes.
        assert_eq!(unlabelled.encode_to_vec(), old.encode_to_vec());
        // An older agent reads a labelled endpoint as before.
        let labelled = Endpoint {
            zone: "east".into(),
            locality_region: "eu".into(),
            locality_zone: "eu-1a".into(),
            locality_subzone: "rack-3".into(),
            ..unlabelled.clone()
        };
        let seen_by_old = EndpointV1::decode(labelled.encode_to_vec().as_slice()).unwrap();
        assert_eq!(seen_by_old, old);
        // A newer agent reads an older zone's endpoint as unlabelled.
        assert_eq!(
            Endpoint::decode(old.encode_to_vec().as_slice()).unwrap(),
            unlabelled
        );
        // Equal in the order means equal in every field (patches remove
        // endpoints by it), and the location only breaks ties.
        use super::agent::endpoint_order;
        assert_ne!(
            endpoint_order(&labelled, &unlabelled),
            std::cmp::Ordering::Equal
        );
        let next = Endpoint {
            address: "10.0.0.2".into(),
            ..unlabelled.clone()
        };
        assert_eq!(endpoint_order(&labelled, &next), std::cmp::Ordering::Less);
    }

    #[test]
    fn both_sides_of_the_service_are_generated() {
        // The zone implements the server trait; the agent uses the client.
        fn _server<T: super::agent::v1::agent_service_server::AgentService>() {}
        let _client =
            std::any::type_name::<super::agent::v1::agent_service_client::AgentServiceClient<()>>();
    }
}
