//! Webhooks: made with a URL and an event filter (their signing secret
//! shown once), listed, removed, and their delivery log read. Delivery
//! itself is [`crate::webhooks`].

use super::{audit, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::state::AppState;
use crate::store::control::NewWebhook;
use crate::store::Timestamp;
use uplift_proto::auth::AuditAction;
use uplift_proto::events::{DeliveryView, WebhookCreate, WebhookCreated, WebhookView};

/// Most deliveries one page of the log holds.
pub const MAX_DELIVERY_PAGE: u32 = 1000;
const LONGEST_URL: usize = 2048;

/// Refuses what cannot be a receiver: deliveries go to http(s) URLs with a
/// host, and carry no credentials in the URL (they would be logged).
pub fn check_url(url: &str) -> Result<(), String> {
    if url.len() > LONGEST_URL {
        return Err(format!("is longer than {LONGEST_URL} characters"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "has scheme {:?}; use http or https",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("holds a user name or password; the signature authenticates deliveries".into());
    }
    Ok(())
}

pub async fn create(
    state: &AppState,
    actor: &Principal,
    request: WebhookCreate,
) -> ServiceResult<WebhookCreated> {
    let result = async {
        check_url(&request.url).map_err(|why| ServiceError::BadWebhookUrl {
            url: request.url.chars().take(200).collect(),
            why,
        })?;
        let secret = format!("whsec_{}", hex::encode(rand::random::<[u8; 32]>()));
        let webhook = state
            .store
            .insert_webhook(&NewWebhook {
                url: &request.url,
                secret: &secret,
                filter: &request.filter,
                created_at: Timestamp::now(),
                created_by: &actor.name,
            })
            .await?;
        Ok(WebhookCreated { webhook, secret })
    }
    .await;
    let target = match &result {
        Ok(made) => format!("webhook {} ({})", made.webhook.id, made.webhook.url),
        Err(_) => "webhook (refused)".to_owned(),
    };
    audit::record(state, actor, AuditAction::WebhookCreate, &target, &result).await;
    result
}

pub async fn list(state: &AppState) -> ServiceResult<Vec<WebhookView>> {
    Ok(state
        .store
        .webhooks()
        .await?
        .into_iter()
        .map(|w| w.view)
        .collect())
}

/// Stops deliveries to webhook `id`; its log stays. Again is a no-op.
pub async fn remove(state: &AppState, actor: &Principal, id: i64) -> ServiceResult<WebhookView> {
    let result = state
        .store
        .remove_webhook(id, Timestamp::now())
        .await
        .map_err(ServiceError::from)
        .and_then(|w| w.ok_or(ServiceError::WebhookNotFound { id }));
    let target = match &result {
        Ok(w) => format!("webhook {} ({})", w.id, w.url),
        Err(_) => format!("webhook {id}"),
    };
    audit::record(state, actor, AuditAction::WebhookRemove, &target, &result).await;
    result
}

/// Webhook `id`'s deliveries, newest first.
pub async fn deliveries(
    state: &AppState,
    id: i64,
    before: Option<i64>,
    limit: Option<u32>,
) -> ServiceResult<Vec<DeliveryView>> {
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > MAX_DELIVERY_PAGE {
        return Err(ServiceError::PageSize {
            limit,
            max: MAX_DELIVERY_PAGE,
        });
    }
    if !state
        .store
        .webhooks()
        .await?
        .iter()
        .any(|w| w.view.id == id)
    {
        return Err(ServiceError::WebhookNotFound { id });
    }
    Ok(state.store.deliveries(id, before, limit).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_and_https_receivers_are_taken() {
        assert!(check_url("https://hooks.example.com/uplift").is_ok());
        assert!(check_url("http://127.0.0.1:8080/hook?x=1").is_ok());
        for (bad, says) in [
            ("ftp://example.com/", "scheme"),
            ("not a url", "not a URL"),
            ("https://user:pw@example.com/", "password"),
            ("file:///etc/passwd", "scheme"),
        ] {
            let why = check_url(bad).unwrap_err();
            assert!(why.contains(says), "{bad}: {why}");
        }
        assert!(check_url(&format!("https://e.com/{}", "a".repeat(3000))).is_err());
    }
}
