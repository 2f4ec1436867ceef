//! [`AuthUser`]: the caller, from `Authorization: Bearer <access token>`; and
//! [`AdminUser`]: a caller whose token grants the admin role.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use uuid::Uuid;

use super::AuthState;
use crate::error::ApiError;

/// The authenticated caller. Put it in a handler's arguments and the handler runs only
/// for a valid access token (Colloquy's own, or the configured identity provider's; see
/// [`AuthState::authenticate`]): anything missing, malformed, expired, tampered with,
/// wrongly signed (or `alg: none`), or for another issuer or audience is rejected with
/// 401 `unauthorized` problem+json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser {
    /// The user id (the token's `sub`).
    pub id: Uuid,
    /// Whether the token grants the admin role.
    pub admin: bool,
}

impl<S> FromRequestParts<S> for AuthUser
where
    S: Send + Sync,
    AuthState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Verified already by the command rate limit, for the same header.
        if let Some(user) = parts.extensions.get::<AuthUser>() {
            return Ok(*user);
        }
        let auth = AuthState::from_ref(state);
        let token = bearer_token(&parts.headers).ok_or_else(|| {
            tracing::debug!("no usable bearer token in the request");
            ApiError::Unauthorized
        })?;
        auth.authenticate(token).await
    }
}

/// The authenticated caller, when their token grants the admin role: what every
/// `/v1/admin` route takes. A missing or invalid token is 401 as for [`AuthUser`]; a
/// valid token without the role is 403 `forbidden` (the admin routes are not another
/// user's resources to hide, so 404 would only confuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminUser(pub AuthUser);

impl<S> FromRequestParts<S> for AdminUser
where
    S: Send + Sync,
    AuthState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        if user.admin {
            Ok(Self(user))
        } else {
            tracing::info!(user.id = %user.id, path = parts.uri.path(), "an admin route was refused to a user without the role");
            Err(ApiError::Forbidden)
        }
    }
}

/// The token of the one `Authorization: Bearer <token>` header (scheme case-insensitive,
/// RFC 9110 §11.1), if there is exactly one and it has that shape.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

#[cfg(test)]
mod tests {
    use axum::http::Request;

    use super::*;

    fn token_of(values: &[&str]) -> Option<String> {
        let mut request = Request::builder();
        for value in values {
            request = request.header(AUTHORIZATION, *value);
        }
        let (parts, ()) = request.body(()).unwrap().into_parts();
        bearer_token(&parts.headers).map(str::to_owned)
    }

    #[test]
    fn bearer_headers_are_parsed_strictly() {
        assert_eq!(token_of(&["Bearer abc"]).as_deref(), Some("abc"));
        assert_eq!(token_of(&["bearer abc"]).as_deref(), Some("abc"));
        assert_eq!(token_of(&[]), None);
        assert_eq!(token_of(&["Bearer"]), None);
        assert_eq!(token_of(&["Bearer "]), None);
        assert_eq!(token_of(&["Basic abc"]), None);
        assert_eq!(token_of(&["Bearer a b"]), None);
        assert_eq!(token_of(&["Bearer abc", "Bearer def"]), None);
    }
}
