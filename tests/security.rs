//! Security through the real interface: JWT authentication (every failure is a 401 before
//! any upgrade), identity that clients cannot spoof, room permissions, sanitizing against an
//! XSS corpus, length limits, rate limits, per-IP caps, origins and CORS.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rtgate::Settings;
use rtgate::config::AuthMode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "test-secret-that-is-long-enough-0123456789";
const AUD: &str = "rtgate-test";
const ISS: &str = "https://issuer.test";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo_path(&format!("tests/fixtures/{name}"))).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "name": format!("{sub} name"), "aud": AUD, "iss": ISS, "exp": now() + 3600, "iat": now()})
}

fn hs256(claims: &Value) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn jwt_settings() -> Settings {
    let mut s = settings();
    s.auth.mode = AuthMode::Jwt;
    s.auth.algorithm = "HS256".into();
    s.auth.secret = SECRET.into();
    s.auth.audience = vec![AUD.into()];
    s.auth.issuer = vec![ISS.into()];
    s.auth.leeway_seconds = 0;
    s
}

fn pem_settings(algorithm: &str, public: &str) -> Settings {
    let mut s = jwt_settings();
    s.auth.algorithm = algorithm.into();
    s.auth.public_key_file = repo_path(&format!("tests/fixtures/{public}"));
    s
}

const UPGRADE: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// An upgrade request over a raw socket: the status and the JSON body.
async fn try_upgrade(gw: &Gw, path: &str, extra: &[(&str, &str)]) -> (u16, Value) {
    let mut headers = UPGRADE.to_vec();
    headers.extend_from_slice(extra);
    let (status, _, body) = http_get(gw.addr, path, &headers).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Connects with an `Authorization: Bearer` header.
async fn connect_with(gw: &Gw, token: &str) -> Client {
    let mut req = gw.url().into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    connect_request(req).await
}

async fn connect_request(req: tokio_tungstenite::tungstenite::handshake::client::Request) -> Client {
    let (ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(req)).await.unwrap().unwrap();
    let mut c = Client { ws, id: String::new(), welcome: Value::Null };
    let welcome = c.expect("welcome").await;
    c.id = welcome["clientId"].as_str().unwrap().to_string();
    c.welcome = welcome;
    c
}

fn b64(v: &Value) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = v.to_string().into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_before_the_upgrade() {
    let gw = Gw::start(jwt_settings()).await;
    let mut expired = claims("u1");
    expired["exp"] = json!(now() - 3600);
    let mut early = claims("u1");
    early["nbf"] = json!(now() + 3600);
    let mut wrong_aud = claims("u1");
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("u1");
    wrong_iss["iss"] = json!("https://evil.test");
    let mut no_sub = claims("u1");
    no_sub.as_object_mut().unwrap().remove("sub");
    let other_secret = encode(
        &Header::new(Algorithm::HS256),
        &claims("u1"),
        &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
    )
    .unwrap();
    let alg_none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims("u1")));
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("garbage", Some("not.a.token".into())),
        ("expired", Some(hs256(&expired))),
        ("not yet valid", Some(hs256(&early))),
        ("bad signature", Some(other_secret)),
        ("alg none", Some(alg_none)),
        ("wrong audience", Some(hs256(&wrong_aud))),
        ("wrong issuer", Some(hs256(&wrong_iss))),
        ("no subject", Some(hs256(&no_sub))),
    ];
    for (case, token) in cases {
        let auth = token.map(|t| format!("Bearer {t}"));
        let extra: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (status, body) = try_upgrade(&gw, "/ws", &extra).await;
        assert_eq!(status, 401, "{case}: {body}");
        assert_eq!(body["error"], "unauthorized", "{case}");
    }
    // The same token that works in a header also works in the query and as a subprotocol.
    let token = hs256(&claims("u1"));
    let c = connect_with(&gw, &token).await;
    assert_eq!(c.welcome["userId"], "u1");
    let c = Client::connect(&format!("{}?token={token}", gw.url())).await;
    assert_eq!(c.welcome["userId"], "u1");
    let mut req = gw.url().into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", format!("rtgate.bearer, {token}").parse().unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "rtgate.bearer");
    drop(ws);
}

#[tokio::test]
async fn public_key_algorithms_work_and_algorithm_confusion_does_not() {
    let rs = Gw::start(pem_settings("RS256", "rsa_public.pem")).await;
    let good = encode(
        &Header::new(Algorithm::RS256),
        &claims("r"),
        &EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(connect_with(&rs, &good).await.welcome["userId"], "r");
    // HS256 "signed" with the RSA public key as the HMAC secret.
    let confused =
        encode(&Header::new(Algorithm::HS256), &claims("r"), &EncodingKey::from_secret(&fixture("rsa_public.pem")))
            .unwrap();
    let (status, _) = try_upgrade(&rs, "/ws", &[("Authorization", &format!("Bearer {confused}"))]).await;
    assert_eq!(status, 401);

    let es = Gw::start(pem_settings("ES256", "ec_public.pem")).await;
    let good = encode(
        &Header::new(Algorithm::ES256),
        &claims("e"),
        &EncodingKey::from_ec_pem(&fixture("ec_private.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(connect_with(&es, &good).await.welcome["userId"], "e");

    let ed = Gw::start(pem_settings("EdDSA", "ed_public.pem")).await;
    let good = encode(
        &Header::new(Algorithm::EdDSA),
        &claims("d"),
        &EncodingKey::from_ed_pem(&fixture("ed_private.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(connect_with(&ed, &good).await.welcome["userId"], "d");
    // An RS256 token where EdDSA is configured.
    let rs_token = encode(
        &Header::new(Algorithm::RS256),
        &claims("d"),
        &EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap(),
    )
    .unwrap();
    let (status, _) = try_upgrade(&ed, "/ws", &[("Authorization", &format!("Bearer {rs_token}"))]).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn identity_comes_from_the_token_and_cannot_be_spoofed() {
    let gw = Gw::start(jwt_settings()).await;
    let mut a = connect_with(&gw, &hs256(&claims("alice"))).await;
    let mut b = connect_with(&gw, &hs256(&claims("bob"))).await;
    assert_eq!((a.welcome["userId"].as_str(), a.welcome["username"].as_str()), (Some("alice"), Some("alice name")));
    a.join("lobby").await;
    b.join("lobby").await;
    a.expect("user_joined").await;
    a.send(json!({"type": "chat_message", "room": "lobby", "message": "hi", "username": "bob name", "userId": "bob"}))
        .await;
    for c in [&mut a, &mut b] {
        let m = c.expect("new_message").await;
        assert_eq!((m["userId"].as_str(), m["username"].as_str()), (Some("alice"), Some("alice name")));
    }
    a.send(json!({"type": "chat", "room": "lobby", "message": "x", "clientId": b.id})).await;
    assert_eq!(b.expect("chat_message").await["clientId"], a.id.as_str());
    assert_eq!(a.expect("chat_message").await["clientId"], a.id.as_str());
    a.expect_error(json!({"type": "set_name", "name": "bob name"}), "forbidden").await;
}

#[tokio::test]
async fn room_permissions_cover_join_publish_and_http_history() {
    let mut s = jwt_settings();
    s.auth.private_room_prefixes = vec!["private:".into()];
    let gw = Gw::start(s).await;
    let mut limited = claims("gamer");
    limited["rooms"] = json!(["game-*", "lobby"]);
    let limited = hs256(&limited);
    let mut c = connect_with(&gw, &limited).await;
    c.join("game-7").await;
    c.join("lobby").await;
    c.expect_error(json!({"type": "join_room", "room": "secret"}), "forbidden").await;
    c.expect_error(json!({"type": "chat", "room": "secret", "message": "x"}), "forbidden").await;
    c.expect_error(json!({"type": "typing_start", "room": "secret"}), "forbidden").await;

    // Without a rooms claim: anything but private rooms.
    let mut open = connect_with(&gw, &hs256(&claims("plain"))).await;
    open.join("secret").await;
    open.expect_error(json!({"type": "join_room", "room": "private:board"}), "forbidden").await;
    let mut board = claims("boss");
    board["rooms"] = json!(["private:board"]);
    let mut boss = connect_with(&gw, &hs256(&board)).await;
    boss.join("private:board").await;

    let auth = format!("Bearer {limited}");
    let (status, _, _) = http_get(gw.addr, "/rooms/lobby/history", &[]).await;
    assert_eq!(status, 401, "history needs the token too");
    let (status, _, _) = http_get(gw.addr, "/rooms/lobby/history", &[("Authorization", &auth)]).await;
    assert_eq!(status, 200);
    let (status, _, body) = http_get(gw.addr, "/rooms/secret/history", &[("Authorization", &auth)]).await;
    assert_eq!(status, 403, "{body}");
    let (status, _, _) = http_get(gw.addr, &format!("/rooms/game-7/history?token={limited}"), &[]).await;
    assert_eq!(status, 200);

    // Guests never enter private rooms.
    let guests = Gw::default().await;
    let mut g = guests.client().await;
    g.expect_error(json!({"type": "join_room", "room": "private:x"}), "forbidden").await;
    let (status, _, _) = http_get(guests.addr, "/rooms/private:x/history", &[]).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn broadcast_is_for_administrators_only() {
    let gw = Gw::start(jwt_settings()).await;
    let mut admin = claims("root");
    admin["role"] = json!("admin");
    let mut root = connect_with(&gw, &hs256(&admin)).await;
    let mut user = connect_with(&gw, &hs256(&claims("user"))).await;
    root.send(json!({"type": "broadcast", "message": "maintenance at noon"})).await;
    let m = user.expect("broadcast").await;
    assert_eq!((m["message"].as_str(), m["userId"].as_str()), (Some("maintenance at noon"), Some("root")));
    user.expect_error(json!({"type": "broadcast", "message": "me too"}), "forbidden").await;
    root.sync().await;

    let guests = Gw::default().await;
    let mut g = guests.client().await;
    g.expect_error(json!({"type": "broadcast", "message": "hi"}), "forbidden").await;
}

/// OWASP XSS filter evasion cheat sheet payloads (and a few more), as test data.
const XSS: &[&str] = &[
    "<script>alert('XSS')</script>",
    "<SCRIPT SRC=https://xss.example/xss.js></SCRIPT>",
    "javascript:/*--></title></style></textarea></script></xmp><svg/onload='+/\"/+/onmouseover=1/+/[*/[]/+alert(1)//'>",
    "<IMG SRC=\"javascript:alert('XSS');\">",
    "<IMG SRC=javascript:alert('XSS')>",
    "<IMG SRC=JaVaScRiPt:alert('XSS')>",
    "<IMG SRC=`javascript:alert(\"RSnake says, 'XSS'\")`>",
    "<a onmouseover=\"alert(document.cookie)\">xxs link</a>",
    "<a onmouseover=alert(document.cookie)>xxs link</a>",
    "<IMG \"\"\"><SCRIPT>alert(\"XSS\")</SCRIPT>\"\\>",
    "<IMG SRC=javascript:alert(String.fromCharCode(88,83,83))>",
    "<IMG SRC=# onmouseover=\"alert('xxs')\">",
    "<IMG SRC=/ onerror=\"alert(String.fromCharCode(88,83,83))\"></img>",
    "<img src=x onerror=\"&#0000106&#0000097&#0000118&#0000097&#0000115&#0000099&#0000114&#0000105&#0000112&#0000116&#0000058&#0000097&#0000108&#0000101&#0000114&#0000116&#0000040&#0000039&#0000088&#0000083&#0000083&#0000039&#0000041\">",
    "<IMG SRC=&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;&#97;&#108;&#101;&#114;&#116;&#40;&#39;&#88;&#83;&#83;&#39;&#41;>",
    "<IMG SRC=&#x6A&#x61&#x76&#x61&#x73&#x63&#x72&#x69&#x70&#x74&#x3A&#x61&#x6C&#x65&#x72&#x74&#x28&#x27&#x58&#x53&#x53&#x27&#x29>",
    "<IMG SRC=\"jav\tascript:alert('XSS');\">",
    "<IMG SRC=\"jav&#x0A;ascript:alert('XSS');\">",
    "<IMG SRC=\" &#14;  javascript:alert('XSS');\">",
    "<SCRIPT/XSS SRC=\"https://xss.example/xss.js\"></SCRIPT>",
    "<BODY onload!#$%&()*~+-_.,:;?@[/|\\]^`=alert(\"XSS\")>",
    "<<SCRIPT>alert(\"XSS\");//\\<</SCRIPT>",
    "<SCRIPT SRC=//xss.example/.j>",
    "<IMG SRC=\"`<javascript:alert>`('XSS')\"",
    "</TITLE><SCRIPT>alert(\"XSS\");</SCRIPT>",
    "<INPUT TYPE=\"IMAGE\" SRC=\"javascript:alert('XSS');\">",
    "<BODY BACKGROUND=\"javascript:alert('XSS')\">",
    "<IMG DYNSRC=\"javascript:alert('XSS')\">",
    "<STYLE>li {list-style-image: url(\"javascript:alert('XSS')\");}</STYLE><UL><LI>XSS</br>",
    "<svg/onload=alert('XSS')>",
    "<BODY ONLOAD=alert('XSS')>",
    "<IFRAME SRC=\"javascript:alert('XSS');\"></IFRAME>",
    "<TABLE BACKGROUND=\"javascript:alert('XSS')\">",
    "<DIV STYLE=\"background-image: url(javascript:alert('XSS'))\">",
    "<DIV STYLE=\"width: expression(alert('XSS'));\">",
    "<a href=\"javascript:alert(1)\">click</a>",
    "<a href=\"jav&#x09;ascript:alert(1)\">click</a>",
    "<b style=\"color:red\" onclick=\"x()\">bold</b>",
    "<math><mi xlink:href=\"javascript:alert(1)\">x</mi></math>",
    "<object data=\"javascript:alert(1)\"></object>",
    "<embed src=\"javascript:alert(1)\">",
    "<meta http-equiv=\"refresh\" content=\"0;url=javascript:alert(1)\">",
    "<form action=\"javascript:alert(1)\"><button>x</button></form>",
    "<details open ontoggle=alert(1)>",
    "<!--<img src=x onerror=alert(1)>-->",
];

/// Every tag in `html` is an allowed one, with no attribute but a safe `href` (and the
/// `rel` the sanitizer adds).
fn assert_inert(html: &str, payload: &str) {
    let allowed = ["b", "i", "em", "strong", "u", "s", "code", "br", "a"];
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').map(|e| start + e).unwrap_or_else(|| panic!("unclosed tag in {html:?}"));
        let tag = &rest[start + 1..end];
        let tag = tag.strip_prefix('/').unwrap_or(tag);
        let mut parts = tag.split_whitespace();
        let name = parts.next().unwrap_or("").to_ascii_lowercase();
        assert!(allowed.contains(&name.as_str()), "tag <{name}> survived {payload:?}: {html:?}");
        let attrs = tag[name.len()..].trim();
        let mut a = attrs;
        while !a.is_empty() {
            let (attr, after) = a.split_once('=').unwrap_or((a, ""));
            assert!(["href", "rel"].contains(&attr.trim()), "attribute {attr} survived {payload:?}: {html:?}");
            let value_end = after[1..].find('"').map(|e| e + 2).unwrap_or(after.len());
            let value = &after[..value_end];
            if attr.trim() == "href" {
                let v = value.trim_matches('"');
                assert!(
                    v.starts_with("http://") || v.starts_with("https://") || v.starts_with("mailto:"),
                    "unsafe href {v:?} from {payload:?}"
                );
            }
            a = after[value_end..].trim_start();
        }
        rest = &rest[end + 1..];
    }
}

#[tokio::test]
async fn an_xss_corpus_comes_out_inert() {
    assert!(XSS.len() >= 30);
    let mut s = settings();
    s.limits.max_message_chars = 2000;
    let gw = Gw::start(s).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("xss").await;
    b.join("xss").await;
    a.expect("user_joined").await;
    for payload in XSS {
        a.send(json!({"type": "chat", "room": "xss", "message": payload})).await;
        let m = a.recv().await;
        match m["type"].as_str() {
            Some("chat_message") => {
                let seen = b.expect("chat_message").await["message"].as_str().unwrap().to_string();
                assert_inert(&seen, payload);
            }
            // Cleaned down to nothing: refused, and nobody got anything.
            Some("error") => assert_eq!(m["code"], "empty_message", "{payload}: {m}"),
            _ => panic!("{m}"),
        }
        // Other free-text fields go through the same cleaning. The relay after the notice
        // marks where b's messages for this payload end.
        a.send(json!({"type": "file_share", "room": "xss", "filename": payload, "size": 1, "mimeType": "text/plain"}))
            .await;
        a.send(json!({"type": "game_move", "room": "xss", "note": payload, "nested": {"deep": [payload]}})).await;
        let mut relayed = b.recv().await;
        if relayed["type"] == "file_received" {
            assert_inert(relayed["filename"].as_str().unwrap(), payload);
            relayed = b.expect("opponent_move").await;
        }
        assert_eq!(relayed["type"], "opponent_move");
        assert_inert(relayed["note"].as_str().unwrap(), payload);
        assert_inert(relayed["nested"]["deep"][0].as_str().unwrap(), payload);
        // A notice whose filename cleaned down to nothing was refused to a alone.
        a.send(json!({"type": "join_room", "room": "xss"})).await;
        loop {
            let m = a.recv().await;
            if m["type"] == "room_joined" {
                break;
            }
            assert_eq!((m["type"].as_str(), m["code"].as_str()), (Some("error"), Some("invalid_filename")), "{m}");
        }
    }
    a.send(json!({"type": "set_name", "name": "<img src=x onerror=alert(1)>eve"})).await;
    let named = a.expect("name_set").await;
    assert_inert(named["username"].as_str().unwrap(), "set_name");
    assert_eq!(named["username"], "&lt;img src=x onerror=alert(1)&gt;eve");
}

#[tokio::test]
async fn plain_text_with_markup_characters_round_trips_as_escaped_html() {
    let gw = Gw::default().await;
    let mut a = gw.client().await;
    a.join("text").await;
    a.send(json!({"type": "chat", "room": "text", "message": "a < b && c > d, <b>bold</b>"})).await;
    let m = a.expect("chat_message").await;
    assert_eq!(m["message"], "a &lt; b &amp;&amp; c &gt; d, <b>bold</b>");
    // Tag-like text that is not allowed markup is kept as text, not dropped.
    a.send(json!({"type": "chat", "room": "text", "message": "Vec<T>, x<y, <script>alert(1)</script>, &lt;"})).await;
    let m = a.expect("chat_message").await;
    assert_eq!(m["message"], "Vec&lt;T&gt;, x&lt;y, &lt;script&gt;alert(1)&lt;/script&gt;, &amp;lt;");
}

#[tokio::test]
async fn message_length_is_counted_in_characters_as_sent() {
    let gw = Gw::start(strict_settings()).await;
    let mut a = gw.client().await;
    a.join("len").await;
    a.send(json!({"type": "chat", "room": "len", "message": "😀".repeat(500)})).await;
    assert_eq!(a.expect("chat_message").await["message"].as_str().unwrap().chars().count(), 500);
    a.send(json!({"type": "chat", "room": "len", "message": "x".repeat(501)})).await;
    assert_eq!(a.recv().await, json!({"type": "error", "code": "message_too_long", "message": "Message too long"}));
    // Counted before cleaning: 500 characters of "<" become 2,000 of "&lt;", and pass.
    a.send(json!({"type": "chat", "room": "len", "message": "<".repeat(500)})).await;
    assert_eq!(a.expect("chat_message").await["message"], "&lt;".repeat(500));
    a.expect_error(json!({"type": "chat", "room": "len", "message": "   "}), "empty_message").await;
    a.expect_error(json!({"type": "chat", "room": "len", "message": "<b> </b><i></i>"}), "empty_message").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_limited_then_disconnected_and_nobody_else_notices() {
    let gw = Gw::start(strict_settings()).await;
    let mut flooder = gw.client().await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    flooder.join("f").await;
    a.join("calm").await;
    b.join("calm").await;
    a.expect("user_joined").await;
    // The default bucket allows a burst of 100: join_room used one.
    for i in 0..99 {
        flooder.send(json!({"type": "chat", "room": "f", "message": format!("m{i}")})).await;
    }
    for _ in 0..99 {
        flooder.expect("chat_message").await;
    }
    flooder.send(json!({"type": "chat", "room": "f", "message": "one too many"})).await;
    let limited = flooder.expect("error").await;
    assert_eq!(limited["code"], "rate_limited");
    assert!(limited["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0 && ms <= 60_000), "{limited}");
    // Typing has its own bucket.
    flooder.send(json!({"type": "typing_start", "room": "f"})).await;
    flooder.sync_typing_ok().await;
    // Keep hammering: disconnected with 1008, while others chat undisturbed.
    let hammer = tokio::spawn(async move {
        for i in 0..2000 {
            if flooder
                .ws
                .send(Message::text(json!({"type": "chat", "room": "f", "message": i.to_string()}).to_string()))
                .await
                .is_err()
            {
                break;
            }
        }
        flooder.expect_close().await
    });
    a.send(json!({"type": "chat", "room": "calm", "message": "unbothered"})).await;
    assert_eq!(b.expect("chat_message").await["message"], "unbothered");
    let close = hammer.await.unwrap().expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "rate limit exceeded");
}

trait TypingOk {
    async fn sync_typing_ok(&mut self);
}

impl TypingOk for Client {
    /// The typing_start just sent was accepted: the next reply is this sync's, not an error.
    async fn sync_typing_ok(&mut self) {
        self.send(json!({"type": "typing_stop", "room": "f"})).await;
        let room = format!("sync-{}", &self.id[self.id.len() - 8..]);
        self.send(json!({"type": "join_room", "room": room})).await;
        // join_room is in the exhausted default bucket: its refusal proves typing got
        // through first, in order.
        let reply = self.expect("error").await;
        assert_eq!(reply["code"], "rate_limited");
    }
}

#[tokio::test]
async fn a_user_shares_one_budget_across_connections() {
    let mut s = jwt_settings();
    s.rate_limits = strict_settings().rate_limits;
    s.rate_limits.buckets.get_mut("default").unwrap().burst = 4;
    let gw = Gw::start(s).await;
    let token = hs256(&claims("same"));
    let mut one = connect_with(&gw, &token).await;
    let mut two = connect_with(&gw, &token).await;
    one.join("a").await;
    one.join("b").await;
    two.join("a").await;
    two.join("b").await;
    one.expect("user_joined").await;
    one.expect("user_joined").await;
    two.expect_error(json!({"type": "join_room", "room": "c"}), "rate_limited").await;
}

#[tokio::test]
async fn per_ip_caps_on_open_and_new_connections() {
    let mut s = settings();
    s.limits.max_connections_per_ip = 3;
    let gw = Gw::start(s).await;
    let _held: Vec<Client> = vec![gw.client().await, gw.client().await, gw.client().await];
    let (status, body) = try_upgrade(&gw, "/ws", &[]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "too_many_connections");

    let mut s = settings();
    s.limits.new_connections_per_ip_per_second = 2;
    let gw = Gw::start(s).await;
    // A burst of twice the rate is allowed, then refused.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(try_upgrade(&gw, "/ws", &[]).await.0);
    }
    assert!(statuses.iter().filter(|s| **s == 101).count() >= 4, "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn origins_are_checked_for_upgrades_and_cors() {
    let mut s = settings();
    s.server.allowed_origins = vec!["https://chat.example".into()];
    s.server.allow_missing_origin = false;
    let gw = Gw::start(s).await;
    assert_eq!(try_upgrade(&gw, "/ws", &[("Origin", "https://chat.example")]).await.0, 101);
    let (status, body) = try_upgrade(&gw, "/ws", &[("Origin", "https://evil.example")]).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden_origin")));
    assert_eq!(try_upgrade(&gw, "/ws", &[]).await.0, 403, "no Origin, and allow_missing_origin = false");

    let (_, headers, _) = http_get(gw.addr, "/rooms/r/history", &[("Origin", "https://chat.example")]).await;
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("https://chat.example"));
    let (_, headers, _) = http_get(gw.addr, "/rooms/r/history", &[("Origin", "https://evil.example")]).await;
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn structural_limits_each_have_their_error() {
    let mut s = settings();
    s.limits.max_json_depth = 4;
    s.limits.max_rooms_per_connection = 2;
    s.limits.max_members_per_room = 2;
    let gw = Gw::start(s).await;
    let mut a = gw.client().await;
    a.send_text(r#"{"type":"chat","message":"x","room":"r","deep":{"a":{"b":{"c":{}}}}}"#).await;
    assert_eq!(a.expect("error").await["code"], "too_deep");
    a.join("one").await;
    a.join("two").await;
    a.expect_error(json!({"type": "join_room", "room": "three"}), "too_many_rooms").await;
    a.join("two").await;
    let mut b = gw.client().await;
    b.join("two").await;
    let mut c = gw.client().await;
    c.expect_error(json!({"type": "join_room", "room": "two"}), "room_full").await;
}

#[tokio::test]
async fn an_expired_token_closes_the_connection_unless_refreshed() {
    let mut s = jwt_settings();
    s.heartbeat.interval = Duration::from_millis(100);
    let gw = Gw::start(s).await;
    // Two connections with the same short token; one refreshes it.
    let mut short = claims("brief");
    short["exp"] = json!(now() + 2);
    let mut c = connect_with(&gw, &hs256(&short)).await;
    let mut r = connect_with(&gw, &hs256(&short)).await;
    let mut long = claims("brief");
    long["exp"] = json!(now() + 3600);
    r.send(json!({"type": "refresh", "token": hs256(&long)})).await;
    assert_eq!(r.expect("token_refreshed").await["expiresAt"], long["exp"]);
    r.expect_error(json!({"type": "refresh", "token": hs256(&claims("mallory"))}), "invalid_token").await;
    r.expect_error(json!({"type": "refresh", "token": "junk"}), "invalid_token").await;

    // The other is closed by the heartbeat sweep that finds its token expired.
    let close = c.expect_close().await.expect("a close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1008, "token expired"));
    // The refreshed one outlives that sweep: past everything queued before it, a ping comes
    // (a sweep at or after the one that closed `c` checked it), and it still answers.
    r.sync().await;
    match tokio::time::timeout(TIMEOUT, r.ws.next()).await.expect("a ping in time") {
        Some(Ok(Message::Ping(_))) => {}
        other => panic!("expected a ping, got {other:?}"),
    }
    r.sync().await;
}

#[tokio::test]
async fn guests_get_names_and_may_choose_one() {
    let gw = Gw::default().await;
    let c = gw.client().await;
    assert!(c.welcome["username"].as_str().unwrap().starts_with("guest-"));
    let named = Client::connect(&format!("{}?name=Ada%20L", gw.url())).await;
    assert_eq!(named.welcome["username"], "Ada L");
    let mut c = c;
    c.send(json!({"type": "set_name", "name": "  Grace  "})).await;
    assert_eq!(c.expect("name_set").await["username"], "Grace");
    c.expect_error(json!({"type": "set_name", "name": "x".repeat(33)}), "invalid_name").await;
    c.expect_error(json!({"type": "set_name", "name": "\u{7}"}), "invalid_name").await;
    c.expect_error(json!({"type": "refresh", "token": "t"}), "forbidden").await;
}

/// The 401 an upgrade with `token` gets: its status and `message`.
async fn refusal(gw: &Gw, token: &str) -> (u16, String) {
    let (status, body) = try_upgrade(gw, "/ws", &[("Authorization", &format!("Bearer {token}"))]).await;
    (status, body["message"].as_str().unwrap_or_default().to_string())
}

fn without(mut claims: Value, claim: &str) -> Value {
    claims.as_object_mut().unwrap().remove(claim);
    claims
}

#[tokio::test]
async fn a_configured_audience_or_issuer_must_be_in_the_token() {
    let no_aud = without(claims("u1"), "aud");
    let no_iss = without(claims("u1"), "iss");
    let mut numeric_iss = claims("u1");
    numeric_iss["iss"] = json!(42);
    let gw = Gw::start(jwt_settings()).await;
    for (case, token, reason) in [
        ("no aud", &no_aud, "token lacks a required claim (aud)"),
        ("no iss", &no_iss, "token lacks a required claim (iss)"),
        ("iss not a string", &numeric_iss, "token lacks a required claim (iss)"),
    ] {
        assert_eq!(refusal(&gw, &hs256(token)).await, (401, reason.to_string()), "{case}");
    }
    // Only what is configured is required.
    let mut s = jwt_settings();
    s.auth.issuer = vec![];
    let gw = Gw::start(s).await;
    assert_eq!(connect_with(&gw, &hs256(&no_iss)).await.welcome["userId"], "u1");
    assert_eq!(refusal(&gw, &hs256(&no_aud)).await.0, 401);
    let mut s = jwt_settings();
    s.auth.audience = vec![];
    let gw = Gw::start(s).await;
    assert_eq!(connect_with(&gw, &hs256(&no_aud)).await.welcome["userId"], "u1");
    assert_eq!(refusal(&gw, &hs256(&no_iss)).await.0, 401);
}

#[tokio::test]
async fn a_malformed_rooms_claim_is_refused_not_read_as_no_restriction() {
    let gw = Gw::start(jwt_settings()).await;
    for rooms in [json!(7), json!({"lobby": true}), json!(true), json!(null), json!(["lobby", 3]), json!([["lobby"]])] {
        let mut c = claims("m");
        c["rooms"] = rooms.clone();
        let reason = "token claim rooms must be a room pattern or an array of them".to_string();
        assert_eq!(refusal(&gw, &hs256(&c)).await, (401, reason), "rooms = {rooms}");
    }
    // Well formed, even empty, it is honoured.
    let mut none = claims("m");
    none["rooms"] = json!([]);
    let mut c = connect_with(&gw, &hs256(&none)).await;
    c.expect_error(json!({"type": "join_room", "room": "lobby"}), "forbidden").await;
    // A refresh with a malformed claim is refused and changes nothing.
    let mut lobby = claims("m");
    lobby["rooms"] = json!(["lobby"]);
    let mut c = connect_with(&gw, &hs256(&lobby)).await;
    let mut bad = claims("m");
    bad["rooms"] = json!(1);
    let err = c.expect_error(json!({"type": "refresh", "token": hs256(&bad)}), "invalid_token").await;
    assert_eq!(err["message"], "Token refused: token claim rooms must be a room pattern or an array of them");
    c.expect_error(json!({"type": "join_room", "room": "elsewhere"}), "forbidden").await;
    c.join("lobby").await;
}

#[tokio::test]
async fn a_refresh_that_drops_a_room_leaves_it_as_any_leave_does() {
    let gw = Gw::start(jwt_settings()).await;
    let mut both = claims("alice");
    both["rooms"] = json!(["kept", "dropped"]);
    let mut alice = connect_with(&gw, &hs256(&both)).await;
    let mut bob = connect_with(&gw, &hs256(&claims("bob"))).await;
    for room in ["kept", "dropped"] {
        bob.join(room).await;
        alice.join(room).await;
        bob.expect("user_joined").await;
    }
    alice.send(json!({"type": "typing_start", "room": "dropped"})).await;
    bob.expect("user_typing").await;

    let mut fewer = claims("alice");
    fewer["rooms"] = json!(["kept"]);
    fewer["exp"] = json!(now() + 7200);
    alice.send(json!({"type": "refresh", "token": hs256(&fewer)})).await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "room_left", "room": "dropped", "reason": "forbidden",
               "message": "Your new token does not allow room \"dropped\""})
    );
    assert_eq!(alice.expect("token_refreshed").await["expiresAt"], fewer["exp"]);
    // The others see an ordinary leave, and the plugins' on_leave runs (typing's clears
    // alice's indicator).
    let left = bob.expect("user_left").await;
    assert_eq!((left["room"].as_str(), left["clientId"].as_str()), (Some("dropped"), Some(alice.id.as_str())));
    let stopped = bob.expect("user_stop_typing").await;
    assert_eq!((stopped["room"].as_str(), stopped["userId"].as_str()), (Some("dropped"), Some("alice")));
    // What is said in the dropped room no longer reaches alice: the next message she gets
    // is the one sent after it, in the room she kept.
    bob.send(json!({"type": "chat", "room": "dropped", "message": "not for alice"})).await;
    bob.send(json!({"type": "chat", "room": "kept", "message": "for alice"})).await;
    let m = alice.expect("chat_message").await;
    assert_eq!((m["room"].as_str(), m["message"].as_str()), (Some("kept"), Some("for alice")));
    assert_eq!(gw.gateway().hub.members(&rtgate::protocol::RoomName::parse("dropped").unwrap()).len(), 1);
    alice.expect_error(json!({"type": "leave_room", "room": "dropped"}), "not_in_room").await;
    alice.expect_error(json!({"type": "join_room", "room": "dropped"}), "forbidden").await;
}

#[tokio::test]
async fn the_clock_skew_leeway_applies_after_connect_as_at_connect() {
    let mut s = jwt_settings();
    s.auth.leeway_seconds = 60;
    s.heartbeat.interval = Duration::from_millis(100);
    let gw = Gw::start(s).await;
    // Expired 52 s ago: inside the leeway for 8 more seconds.
    let mut late = claims("late");
    late["exp"] = json!(now() - 52);
    let mut c = connect_with(&gw, &hs256(&late)).await;
    // A heartbeat round that pings the connection is one that did not close it.
    let mut pings = 0;
    while pings < 3 {
        match tokio::time::timeout(TIMEOUT, futures_util::StreamExt::next(&mut c.ws)).await.expect("a frame") {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected heartbeat pings, got {other:?}"),
        }
    }
    // Past exp + leeway, the heartbeat closes it.
    let close = c.expect_close().await.expect("a close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1008, "token expired"));
}

#[tokio::test]
async fn room_less_chat_reaches_everyone_only_where_allowed() {
    const REFUSED: &str = "Messages to everyone are turned off on this server: send to a room";
    // In jwt mode it is off by default; administrators may still.
    let gw = Gw::start(jwt_settings()).await;
    let mut admin = claims("root");
    admin["role"] = json!("admin");
    let mut root = connect_with(&gw, &hs256(&admin)).await;
    let mut user = connect_with(&gw, &hs256(&claims("user"))).await;
    let mut other = connect_with(&gw, &hs256(&claims("other"))).await;
    user.send(json!({"type": "chat", "message": "everyone!"})).await;
    user.send(json!({"type": "chat_message", "message": "everyone!"})).await;
    for _ in ["chat", "chat_message"] {
        let err = user.expect("error").await;
        assert_eq!((err["code"].as_str(), err["message"].as_str()), (Some("room_required"), Some(REFUSED)));
    }
    root.send(json!({"type": "chat", "message": "from root"})).await;
    root.send(json!({"type": "chat_message", "message": "from root too"})).await;
    // The refused ones reached nobody: the admin's are the first the others get.
    assert_eq!(other.expect("chat_message").await["message"], "from root");
    assert_eq!(other.expect("new_message").await["message"], "from root too");
    assert_eq!(user.expect("chat_message").await["message"], "from root");
    assert_eq!(user.expect("new_message").await["message"], "from root too");
    assert_eq!(root.expect("new_message").await["message"], "from root too");

    let mut s = jwt_settings();
    s.limits.allow_global_chat = Some(true);
    let gw = Gw::start(s).await;
    let mut user = connect_with(&gw, &hs256(&claims("user"))).await;
    let mut other = connect_with(&gw, &hs256(&claims("other"))).await;
    user.send(json!({"type": "chat", "message": "allowed"})).await;
    assert_eq!(other.expect("chat_message").await["message"], "allowed");

    // Guests keep the seed's behaviour unless it is turned off.
    let mut s = settings();
    s.limits.allow_global_chat = Some(false);
    let gw = Gw::start(s).await;
    let mut guest = gw.client().await;
    let mut other = gw.client().await;
    let err = guest.expect_error(json!({"type": "chat", "message": "everyone!"}), "room_required").await;
    assert_eq!(err["message"], REFUSED);
    guest.join("r").await;
    other.join("r").await;
    assert_eq!(guest.expect("user_joined").await["clientId"], other.id.as_str());
    guest.send(json!({"type": "chat", "room": "r", "message": "in the room"})).await;
    assert_eq!(other.expect("chat_message").await["message"], "in the room");
}

#[tokio::test]
async fn sub_may_be_an_integer_and_exp_is_required() {
    const SUB: &str = "token claim sub must be a string of 1 to 256 bytes or an integer";
    let gw = Gw::start(jwt_settings()).await;
    let mut numeric = claims("x");
    numeric["sub"] = json!(12345);
    let c = connect_with(&gw, &hs256(&numeric)).await;
    assert_eq!((c.welcome["userId"].as_str(), c.welcome["username"].as_str()), (Some("12345"), Some("x name")));
    for (sub, reason) in [(json!(1.5), SUB), (json!(true), SUB), (json!(""), SUB), (json!("x".repeat(257)), SUB)] {
        let mut c = claims("x");
        c["sub"] = sub.clone();
        assert_eq!(refusal(&gw, &hs256(&c)).await, (401, reason.to_string()), "sub = {sub}");
    }
    assert_eq!(
        refusal(&gw, &hs256(&without(claims("x"), "exp"))).await,
        (401, "token lacks a required claim (exp)".to_string())
    );
    let mut text_exp = claims("x");
    text_exp["exp"] = json!((now() + 3600).to_string());
    assert_eq!(refusal(&gw, &hs256(&text_exp)).await, (401, "token claim exp must be a number".to_string()));
}
