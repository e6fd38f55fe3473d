//! `GET /openapi.json`: the OpenAPI 3.1 document of the global endpoint.
//!
//! Both halves are written by hand at the repository's root: `openapi/node.json` (the
//! node's public API, which the gateway proxies) and `openapi/gateway.json` (the
//! gateway's own paths and the answers only the gateway gives). They are merged once, on
//! first use, so the proxied paths can never drift from the node's document.

use serde_json::{Map, Value};
use std::sync::OnceLock;

const NODE: &str = include_str!("../../openapi/node.json");
const GATEWAY: &str = include_str!("../../openapi/gateway.json");

/// The merged document, serialised.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| merge(parse(NODE), parse(GATEWAY)).to_string())
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("the OpenAPI documents are valid JSON (unit-tested)")
}

/// The node's paths, each operation with the gateway's `x-proxy-responses` added where
/// the node lists none for that status; then the gateway's own paths, which win where
/// both have one (`/metrics`, `/openapi.json` are the gateway's own).
fn merge(node: Value, mut gateway: Value) -> Value {
    let proxy_responses = gateway
        .as_object_mut()
        .and_then(|g| g.remove("x-proxy-responses"))
        .unwrap_or_default();
    let mut doc = gateway.clone();
    let mut paths = Map::new();
    for (path, mut item) in object(&node["paths"]) {
        for (_, operation) in item.as_object_mut().into_iter().flatten() {
            let responses = operation["responses"]
                .as_object_mut()
                .expect("every operation has responses");
            for (status, response) in object(&proxy_responses) {
                responses.entry(status).or_insert(response);
            }
        }
        paths.insert(path, item);
    }
    paths.extend(object(&gateway["paths"]));
    doc["paths"] = Value::Object(paths);
    let mut components = object(&node["components"]);
    for (kind, entries) in object(&gateway["components"]) {
        let mut merged = object(components.get(&kind).unwrap_or(&Value::Null));
        merged.extend(object(&entries));
        components.insert(kind, Value::Object(merged));
    }
    doc["components"] = Value::Object(components);
    let mut tags = node["tags"].as_array().cloned().unwrap_or_default();
    tags.extend(gateway["tags"].as_array().cloned().unwrap_or_default());
    doc["tags"] = Value::Array(tags);
    doc
}

fn object(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxied_paths_get_the_gateways_answers_and_its_own_paths_win() {
        let doc: Value = serde_json::from_str(document()).unwrap();
        let order = &doc["paths"]["/orders"]["post"]["responses"];
        for status in [
            "201", "400", "401", "403", "413", "429", "502", "503", "504",
        ] {
            assert!(order.get(status).is_some(), "POST /orders lacks {status}");
        }
        // The node's own description of its 503 stays.
        assert_eq!(
            order["503"]["$ref"], "#/components/responses/Unavailable",
            "{order}"
        );
        assert_eq!(
            doc["paths"]["/metrics"]["get"]["operationId"],
            "gatewayMetrics"
        );
        assert!(doc["paths"]["/gateway/regions"]["get"].is_object());
        assert!(doc["components"]["schemas"]["Order"].is_object());
        assert!(doc["components"]["schemas"]["GatewayRegions"].is_object());
        assert!(doc.get("x-proxy-responses").is_none());
    }
}
