-- Default model list and prices, applied once per database (re-seeding would undo admin edits).
-- Prices are USD per 1,000 tokens (input, output), from each provider's public price page as of
-- 2025-11: openai.com/api/pricing, anthropic.com/pricing#api (claude.com/pricing),
-- ai.google.dev/gemini-api/docs/pricing (prompts up to 200k tokens), mistral.ai/pricing.
-- Edit them with PUT /api/models/<name>; the proxy picks up changes within seconds.

INSERT INTO models (name, provider, upstream_model, fallbacks, input_cost_per_1k, output_cost_per_1k, task_types) VALUES
    ('gpt-5', 'openai', 'gpt-5', '[]', 0.00125, 0.01, '["text_generation","question_answering","code_generation"]'),
    ('gpt-5-mini', 'openai', 'gpt-5-mini', '[]', 0.00025, 0.002, '["text_generation"]'),
    ('gpt-5-nano', 'openai', 'gpt-5-nano', '[]', 0.00005, 0.0004, '[]'),
    ('gpt-4.1', 'openai', 'gpt-4.1', '[]', 0.002, 0.008, '[]'),
    ('gpt-4.1-mini', 'openai', 'gpt-4.1-mini', '[]', 0.0004, 0.0016, '[]'),
    ('gpt-4.1-nano', 'openai', 'gpt-4.1-nano', '[]', 0.0001, 0.0004, '[]'),
    ('gpt-4o', 'openai', 'gpt-4o', '[]', 0.0025, 0.01, '[]'),
    ('gpt-4o-mini', 'openai', 'gpt-4o-mini', '[]', 0.00015, 0.0006, '["summarization","sentiment_analysis"]'),
    ('o3', 'openai', 'o3', '[]', 0.002, 0.008, '[]'),
    ('o4-mini', 'openai', 'o4-mini', '[]', 0.0011, 0.0044, '[]'),
    ('claude-opus-4-1', 'anthropic', 'claude-opus-4-1', '[]', 0.015, 0.075, '[]'),
    ('claude-sonnet-4-5', 'anthropic', 'claude-sonnet-4-5', '[]', 0.003, 0.015, '["code_generation","question_answering"]'),
    ('claude-haiku-4-5', 'anthropic', 'claude-haiku-4-5', '[]', 0.001, 0.005, '["summarization"]'),
    ('claude-3-5-haiku-latest', 'anthropic', 'claude-3-5-haiku-latest', '[]', 0.0008, 0.004, '[]'),
    ('gemini-2.5-pro', 'gemini', 'gemini-2.5-pro', '[]', 0.00125, 0.01, '["question_answering"]'),
    ('gemini-2.5-flash', 'gemini', 'gemini-2.5-flash', '[]', 0.0003, 0.0025, '["summarization","text_generation"]'),
    ('gemini-2.5-flash-lite', 'gemini', 'gemini-2.5-flash-lite', '[]', 0.0001, 0.0004, '["sentiment_analysis"]'),
    ('gemini-2.0-flash', 'gemini', 'gemini-2.0-flash', '[]', 0.0001, 0.0004, '[]'),
    ('mistral-large-latest', 'mistral', 'mistral-large-latest', '[]', 0.002, 0.006, '["text_generation"]'),
    ('mistral-medium-latest', 'mistral', 'mistral-medium-latest', '[]', 0.0004, 0.002, '[]'),
    ('mistral-small-latest', 'mistral', 'mistral-small-latest', '[]', 0.0001, 0.0003, '["sentiment_analysis","summarization"]'),
    ('codestral-latest', 'mistral', 'codestral-latest', '[]', 0.0003, 0.0009, '["code_generation"]'),
    ('echo', 'echo', 'echo', '[]', 0, 0, '["text_generation","summarization","sentiment_analysis","question_answering"]')
ON CONFLICT (name) DO NOTHING;
