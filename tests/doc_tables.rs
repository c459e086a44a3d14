//! The reference tables of docs/plugins.md against the running gateway: the fields of the
//! `client` table a handler receives, and the bundled plugins with the events they handle.

mod common;

use common::*;
use serde_json::{Value, json};

fn plugins_md() -> String {
    std::fs::read_to_string(repo_path("docs/plugins.md")).expect("docs/plugins.md")
}

/// The names inside the first `{…}` of the line starting with `prefix`: `{ id = …, userId
/// = … }` and `{id, userId}` both give `["id", "userId"]`.
fn documented_fields(doc: &str, prefix: &str) -> Vec<String> {
    let line = doc.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix:?}"));
    let inner = line.split('{').nth(1).and_then(|rest| rest.split('}').next()).expect("a {…} on the line");
    let mut fields: Vec<String> =
        inner.split(',').map(|f| f.split('=').next().unwrap().trim().to_string()).filter(|f| !f.is_empty()).collect();
    fields.sort();
    fields
}

const FIELDS: &str = r#"
local function keys(t)
  local out = {}
  for k in pairs(t) do
    table.insert(out, k)
  end
  table.sort(out)
  return rtgate.array(out)
end

rtgate.on("fields", function(client, event)
  rtgate.send(client.id, {
    type = "fields",
    handler = keys(client),
    lookup = keys(rtgate.client(client.id)),
  })
end)
"#;

#[tokio::test]
async fn the_client_table_is_documented_field_for_field() {
    let dir = plugin_dir(&[("fields.lua", FIELDS)]);
    let mut s = settings();
    s.plugins.dir = dir.path().to_path_buf();
    let gw = Gw::start(s).await;
    let mut c = gw.client().await;
    c.send(json!({"type": "fields"})).await;
    let seen = c.expect("fields").await;
    let doc = plugins_md();
    assert_eq!(seen["handler"], json!(documented_fields(&doc, "- `client` is")));
    assert_eq!(seen["lookup"], json!(documented_fields(&doc, "| `rtgate.client(clientId)`")));
}

#[tokio::test]
async fn every_bundled_plugin_is_in_the_table_with_its_events() {
    let gw = Gw::default().await;
    let (status, _, body) = http_get(gw.addr, "/healthz", &[]).await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    let doc = plugins_md();
    let table = doc.split("## The bundled plugins").nth(1).expect("the section").split("\n\n").nth(1).unwrap();
    let mut rows: Vec<(String, Vec<String>)> = table
        .lines()
        .skip(2)
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let mut events: Vec<String> = cells[2].split(',').map(|e| e.trim().trim_matches('`').to_string()).collect();
            events.sort();
            (cells[1].trim_matches('`').to_string(), events)
        })
        .collect();
    rows.sort();
    let mut loaded: Vec<(String, Vec<String>)> = health["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let mut events: Vec<String> =
                p["events"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect();
            events.sort();
            (format!("{}.lua", p["name"].as_str().unwrap()), events)
        })
        .collect();
    loaded.sort();
    assert_eq!(rows, loaded);
}
