// rtgate.js client (placeholder)
