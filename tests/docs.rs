//! The examples in the documentation run as written.

mod common;

use common::*;
use serde_json::json;

/// The ```lua blocks of a Markdown file, in order.
fn lua_blocks(doc: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_path(doc)).expect("doc exists");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```lua") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[tokio::test]
async fn the_first_plugin_in_plugins_md_works_as_shown() {
    let blocks = lua_blocks("docs/plugins.md");
    let echo = blocks.first().expect("an example");
    let dir = plugin_dir(&[("echo.lua", echo)]);
    let mut s = settings();
    s.plugins.dir = dir.path().to_path_buf();
    let gw = Gw::start(s).await;
    let mut c = gw.client().await;
    c.send(json!({"type": "echo", "text": "hi"})).await;
    assert_eq!(c.recv().await, json!({"type": "echoed", "text": "hi"}));
    let err = c.expect_error(json!({"type": "echo"}), "invalid_text").await;
    assert_eq!(err["message"], "\"text\" must be a string");
}
