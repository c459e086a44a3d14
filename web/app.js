// rtgate page (placeholder)
