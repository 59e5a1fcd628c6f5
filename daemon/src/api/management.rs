//! Management API for pools (not part of Azure's data plane): bodies are
//! shaped like the ARM `Microsoft.App/sessionPools` `properties`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::pool::{Pool, PoolError};
use crate::pool_spec::{validate_pool_name, PoolProperties, PoolSpecError};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/management/pools", get(list))
        .route(
            "/management/pools/{name}",
            get(show).put(put).delete(delete),
        )
        .route("/management/pools/{name}/sessions", get(sessions))
        .route(
            "/management/pools/{name}/sessions/{identifier}",
            axum::routing::delete(delete_session),
        )
}

fn pool_error(e: PoolError) -> ApiError {
    match e {
        PoolError::NotFound(name) => ApiError::pool_not_found(&name),
        PoolError::ManagedByConfig(_) => {
            ApiError::new(StatusCode::CONFLICT, "PoolManagedByConfig", e.to_string())
        }
        PoolError::Spec(s) => spec_error(s),
        other => ApiError::internal(crate::error_chain(&other)),
    }
}

fn spec_error(e: PoolSpecError) -> ApiError {
    let code = match e {
        PoolSpecError::CustomContainer | PoolSpecError::Egress => "SessionPoolFeatureNotSupported",
        _ => "InvalidPoolProperties",
    };
    ApiError::new(StatusCode::BAD_REQUEST, code, e.to_string())
}

/// A pool as the management API shows it.
pub fn pool_json(state: &AppState, pool: &Pool) -> Value {
    let spec = pool.spec();
    let counts = pool.counts();
    let mut props = serde_json::to_value(PoolProperties::from_spec(&spec)).expect("serializable");
    let extra = json!({
        "poolManagementEndpoint": format!("{}/pools/{}", state.endpoint_base, pool.name),
        "provisioningState": "Succeeded",
        "source": pool.source,
        "backend": pool.backend_kind(),
        "isolation": pool.isolation(),
        "hostCapability": &*state.host,
        "readySessions": counts.ready_sessions,
        "allocatedSessions": counts.allocated_sessions,
        "startingSessions": counts.starting_sessions,
    });
    if let (Some(p), Value::Object(e)) = (props.as_object_mut(), extra) {
        p.extend(e);
    }
    json!({
        "id": format!("/management/pools/{}", pool.name),
        "name": pool.name,
        "type": "Microsoft.App/sessionPools",
        "properties": props,
    })
}

async fn list(State(state): State<Arc<AppState>>) -> Response {
    let pools: Vec<Value> = state
        .pools
        .list()
        .iter()
        .map(|p| pool_json(&state, p))
        .collect();
    axum::Json(json!({ "value": pools })).into_response()
}

async fn show(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.pools.get(&name) {
        Some(p) => axum::Json(pool_json(&state, &p)).into_response(),
        None => ApiError::pool_not_found(&name).into_response(),
    }
}

/// Parses a PUT body: `{"properties": {...}}` (ARM resource shape, other
/// top-level resource fields ignored) or the properties object itself.
fn parse_properties(body: &[u8]) -> Result<PoolProperties, ApiError> {
    let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                format!("the request body is not valid JSON: {e}"),
            )
        })?
    };
    let Value::Object(mut obj) = v else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            "the request body must be a JSON object",
        ));
    };
    let props = match obj.remove("properties") {
        Some(p) => p,
        None => Value::Object(obj),
    };
    serde_json::from_value(props).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidPoolProperties",
            format!("invalid pool properties: {e}"),
        )
    })
}

async fn put(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let result = (|| {
        validate_pool_name(&name).map_err(spec_error)?;
        let props = parse_properties(&body)?;
        let spec = props
            .into_fields(&name)
            .and_then(|f| f.validate())
            .map_err(spec_error)?;
        state.pools.put(spec).map_err(pool_error)
    })();
    match result {
        Ok((pool, created)) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(pool_json(&state, &pool))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn delete(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.pools.delete(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => pool_error(e).into_response(),
    }
}

async fn sessions(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let Some(pool) = state.pools.get(&name) else {
        return ApiError::pool_not_found(&name).into_response();
    };
    let cooldown = pool.spec().cooldown;
    let list: Vec<Value> = pool
        .sessions()
        .iter()
        .map(|s| {
            let mut m = s.metadata(cooldown);
            m["memoryPrivateBytes"] = json!(s.memory_private_bytes());
            m
        })
        .collect();
    axum::Json(json!({ "value": list })).into_response()
}

async fn delete_session(
    State(state): State<Arc<AppState>>,
    Path((name, identifier)): Path<(String, String)>,
) -> Response {
    let Some(pool) = state.pools.get(&name) else {
        return ApiError::pool_not_found(&name).into_response();
    };
    match pool.existing(&identifier) {
        Some(s) => {
            pool.remove_session(&s, "deleted through the management API");
            StatusCode::NO_CONTENT.into_response()
        }
        None => ApiError::session_not_found(&identifier).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_bodies_in_both_shapes() {
        let p = parse_properties(br#"{"location":"x","properties":{"containerType":"Shell"}}"#)
            .unwrap();
        assert_eq!(p.container_type.as_deref(), Some("Shell"));
        let p = parse_properties(br#"{"scaleConfiguration":{"maxConcurrentSessions":2}}"#).unwrap();
        assert_eq!(
            p.scale_configuration.unwrap().max_concurrent_sessions,
            Some(2)
        );
        assert!(parse_properties(b"").is_ok());
        let e = parse_properties(b"{not json").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_properties(br#"{"bogus":1}"#).unwrap_err();
        assert!(e.message.contains("bogus"), "{}", e.message);
    }
}
