// Waddle chat page: the entry point loaded by index.html. The page itself
// lives in ./app/*.js (ES modules, no build step).

import './app/main.js';
